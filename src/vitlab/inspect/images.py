"""Images in, model inputs out, with the run's own preprocessing (`vitlab.preprocess.ImagePreprocess`, read by
`vitlab.modeldir.run_preprocess`).

Images stay uint8 (B, 3, S, S) until the last step, so the attention maps are drawn over exactly the
pixels the model saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitlab.preprocess import ImagePreprocess


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
