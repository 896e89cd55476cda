"""Classify image files with a trained run: the one implementation of "any image -> model input".

Steps, as the run's `preprocessor_config.json` (Hugging Face `ViTImageProcessor` semantics) says: apply the
EXIF orientation, convert to RGB (transparency composited onto white, as transformers' `convert_to_rgb`;
CMYK, L, P, I;16 ... through PIL's convert), resize to the model's size with PIL bicubic, scale by 1/255,
normalise with the training mean/std.
Training images (32x32 CIFAR) went through exactly the scale and normalise steps, with no resize needed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlab.errors import VitlabError
from vitlab.model import VisionTransformer
from vitlab.train.processor import read_preprocessor_config


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB; unreadable or missing files are a VitlabError."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"image {path} not found")
    try:
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's "palette images with transparency" note
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VitlabError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency (alpha band or palette/tRNS transparency) composited onto white."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def preprocess(images: list[Image.Image], processor: dict) -> torch.Tensor:
    """RGB PIL images of any size -> model input (B, 3, H, W) float32, as `processor` specifies."""
    size = processor["size"]
    mean = np.asarray(processor["image_mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(processor["image_std"], dtype=np.float32).reshape(3, 1, 1)
    out = []
    for im in images:
        if processor.get("do_convert_rgb", True) and im.mode != "RGB":
            im = to_rgb(im)
        if processor["do_resize"]:
            im = im.resize((int(size["width"]), int(size["height"])), resample=Image.Resampling(processor["resample"]))
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W), 0..255
        if processor["do_rescale"]:
            x = x * np.float32(processor["rescale_factor"])
        if processor["do_normalize"]:
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return torch.stack(out)  # (B, 3, H, W)


@dataclass
class Prediction:
    path: str
    labels: list[str]  # top-k, most probable first
    probs: list[float]


def load_run(run_dir: str | Path) -> tuple[VisionTransformer, dict, list[str]]:
    """(model in eval mode, preprocessor config, class names) of a run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"run dir {run_dir} not found")
    model = VisionTransformer.from_pretrained(run_dir)
    processor = read_preprocessor_config(run_dir)
    names = VisionTransformer.read_class_names(run_dir) or [str(i) for i in range(model.cfg.num_classes)]
    return model, processor, names


@torch.no_grad()
def predict(run_dir: str | Path, paths: list[str | Path], *, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
    """Top-k labels with softmax probabilities for each image file."""
    if top_k < 1:
        raise VitlabError(f"--top-k must be >= 1, got {top_k}")
    model, processor, names = load_run(run_dir)
    images = [load_image(p) for p in paths]  # read all first: a bad file fails before any work
    k = min(top_k, len(names))
    results = []
    for i in range(0, len(images), batch_size):
        probs = model(preprocess(images[i:i + batch_size], processor)).float().softmax(-1)  # (B, K)
        top = probs.topk(k, dim=-1)
        for j in range(probs.shape[0]):
            results.append(Prediction(str(paths[i + j]), [names[c] for c in top.indices[j].tolist()],
                                      top.values[j].tolist()))
    return results
