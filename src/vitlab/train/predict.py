"""Classify image files with a trained run (or any model dir `vitlab.modeldir.open_model_dir` opens).

Images are read by `vitlab.images.open_image` (EXIF orientation applied, as HF's pipelines do; pixel limit;
16-bit scaled to 8), then prepared as the run's `preprocessor_config.json` (Hugging Face `ViTImageProcessor`
semantics, Pillow resampling as transformers' `ViTImageProcessorPil`) says: RGB (transparency composited onto
white), resize to the model's size with Pillow bicubic, scale by 1/255, normalise with the training mean/std.
Training images (32x32 CIFAR) went through exactly the scale and normalise steps. A DeiT model (distillation
token) predicts with the mean of its class and distillation heads, as its eval-mode forward returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.images import open_image
from vitlab.modeldir import open_model_dir
from vitlab.preprocess import to_rgb


def load_image(path: str | Path, *, target_size: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB (`vitlab.images.open_image`, then transparency onto white)."""
    return to_rgb(open_image(path, target_size=target_size))


@dataclass
class Prediction:
    path: str
    labels: list[str]  # top-k, most probable first
    probs: list[float]


@torch.no_grad()
def predict(run_dir: str | Path, paths: list[str | Path], *, top_k: int = 5, batch_size: int = 64,
            notes: list[str] | None = None) -> list[Prediction]:
    """Top-k labels with softmax probabilities for each image file; `notes` collects what the opener assumed."""
    if top_k < 1:
        raise VitlabError(f"--top-k must be >= 1, got {top_k}")
    md = open_model_dir(run_dir)
    if not md.num_classes:  # a feature extractor, or CLIP / SigLIP (no classifier head)
        raise VitlabError(f"{md.path} holds a {md.what} without a classifier: nothing to predict"
                          + ("; classify by class names with `vitlab zeroshot`" if md.is_clip else ""))
    if notes is not None:
        notes.extend(md.notes)
    names = md.labels
    images = [load_image(p, target_size=md.preprocess.size) for p in paths]  # all first: a bad file fails early
    k = min(top_k, len(names))
    results = []
    for i in range(0, len(images), batch_size):
        probs = md.model(md.preprocess(images[i:i + batch_size])).float().softmax(-1)  # (B, K)
        top = probs.topk(k, dim=-1)
        for j in range(probs.shape[0]):
            results.append(Prediction(str(paths[i + j]), [names[c] for c in top.indices[j].tolist()],
                                      top.values[j].tolist()))
    return results
