"""Images in, model inputs out, with the run's own preprocessing (`vitlab.preprocess.ImagePreprocess`).

Images stay uint8 (B, 3, S, S) until the last step, so the attention maps are drawn over exactly the
pixels the model saw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from vitlab.preprocess import HALF, ImagePreprocess
from vitlab.rundir import PREPROCESSOR_NAME
from vitlab.weights import read_json


def run_preprocess(run_dir: str | Path, *, image_size: int) -> ImagePreprocess:
    """The run's `preprocessor_config.json` (Hugging Face format), output size forced to `image_size`.

    Without the file: resize to image_size x image_size (bicubic) and normalise with mean = std = 0.5, the
    Hugging Face ViT default.
    """
    path = Path(run_dir) / PREPROCESSOR_NAME
    if not path.is_file():
        return ImagePreprocess(size=image_size, resize="square", crop_size=None, mean=HALF, std=HALF)
    pre = ImagePreprocess.from_hf(read_json(path))
    if pre.output_size != image_size:  # the model decides its input size
        pre = dataclasses.replace(pre, size=image_size, crop_size=image_size if pre.crop_size else None)
    return pre


def prepare_images(pre: ImagePreprocess, images: list[str | Path] | torch.Tensor) -> torch.Tensor:
    """Image paths, or uint8 (B, 3, H, W) images -> uint8 (B, 3, S, S) resized (and cropped) as `pre` says."""
    if isinstance(images, torch.Tensor):
        items = list(images.permute(0, 2, 3, 1).cpu().numpy())  # (H, W, 3) arrays
    else:
        items = [str(p) for p in images]
    out = np.stack([pre.prepare(item) for item in items])  # (B, S, S, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def model_inputs(pre: ImagePreprocess, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) prepared images -> normalised float32 (B, 3, S, S) on the same device."""
    x = pre.normalize(images.permute(0, 2, 3, 1).cpu().numpy())  # (B, 3, S, S)
    return x.to(images.device)
