"""Classify image files with a trained run.

Images are read by `vitlab.images.open_image` (EXIF orientation applied, as HF's pipelines do; pixel limit;
16-bit scaled to 8), then prepared by `vitlab.preprocess` as the run's
`preprocessor_config.json` (Hugging Face `ViTImageProcessor` semantics) says: RGB (transparency composited
onto white), resize to the model's size with Pillow bicubic, scale by 1/255, normalise with the training
mean/std. Training images (32x32 CIFAR) went through exactly the scale and normalise steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vitlab.distill import TeacherNet
from vitlab.errors import VitlabError
from vitlab.images import open_image
from vitlab.model import VisionTransformer
from vitlab.preprocess import ImagePreprocess, to_rgb
from vitlab.rundir import read_preprocessor_config
from vitlab.weights import CONFIG_NAME, read_json


def load_image(path: str | Path, *, target_size: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB (`vitlab.images.open_image`, then transparency onto white)."""
    return to_rgb(open_image(path, target_size=target_size))


def preprocess(images: list[Image.Image], processor: dict) -> torch.Tensor:
    """PIL images of any size and mode -> model input (B, 3, H, W) float32, as `processor` specifies.

    `vitlab.preprocess.ImagePreprocess` read from the run's config, with Pillow's resampling as
    transformers' `ViTImageProcessorPil`.
    """
    return dataclasses.replace(ImagePreprocess.from_hf(processor), backend="pil")(images)


@dataclass
class Prediction:
    path: str
    labels: list[str]  # top-k, most probable first
    probs: list[float]


def load_run(run_dir: str | Path) -> tuple[VisionTransformer | TeacherNet, dict, list[str]]:
    """(model in eval mode, preprocessor config, class names) of a run dir (a ViT, or a CNN teacher's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"run dir {run_dir} not found")
    teacher = read_json(run_dir / CONFIG_NAME).get("model_type") == TeacherNet.model_type
    model = (TeacherNet if teacher else VisionTransformer).from_pretrained(run_dir)
    processor = read_preprocessor_config(run_dir)
    names = model.read_class_names(run_dir) or [str(i) for i in range(model.cfg.num_classes)]
    return model, processor, names


@torch.no_grad()
def predict(run_dir: str | Path, paths: list[str | Path], *, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
    """Top-k labels with softmax probabilities for each image file."""
    if top_k < 1:
        raise VitlabError(f"--top-k must be >= 1, got {top_k}")
    model, processor, names = load_run(run_dir)
    size = ImagePreprocess.from_hf(processor).size
    images = [load_image(p, target_size=size) for p in paths]  # all first: a bad file fails early
    k = min(top_k, len(names))
    results = []
    for i in range(0, len(images), batch_size):
        probs = model(preprocess(images[i:i + batch_size], processor)).float().softmax(-1)  # (B, K)
        top = probs.topk(k, dim=-1)
        for j in range(probs.shape[0]):
            results.append(Prediction(str(paths[i + j]), [names[c] for c in top.indices[j].tolist()],
                                      top.values[j].tolist()))
    return results
