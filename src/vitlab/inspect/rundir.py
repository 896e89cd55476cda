"""Read what the trainer leaves in a run directory: model, class names, normalisation, metrics, eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.inspect.images import run_preprocess
from vitlab.model.vit import VisionTransformer
from vitlab.preprocess import ImagePreprocess
from vitlab.rundir import CONFIG_NAME, EVAL_NAME, METRICS_NAME, read_eval_confusion, read_metrics
from vitlab.weights import read_json

CLIP_MODEL_TYPES = ("vitlab_clip", "clip", "siglip")  # vitlab CLIP/SigLIP dirs and Hugging Face ones


@dataclass
class Run:
    path: Path
    model: VisionTransformer
    class_names: list[str]
    preprocess: ImagePreprocess  # resize + normalise as in training (preprocessor_config.json)
    metrics: list[dict] = field(default_factory=list)  # one dict per epoch, from metrics.jsonl
    confusion: torch.Tensor | None = None  # (classes, classes) counts, rows = true class, from eval.json
    notes: list[str] = field(default_factory=list)  # what was missing or skipped, for the report


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by `vitlab train` (or any `save_pretrained` directory).

    A CLIP/SigLIP model directory works too: its image tower (a ViT without classifier) is explained.
    """
    path = Path(path)
    if not path.is_dir():
        raise VitlabError(f"run directory {path} not found")
    if not (path / CONFIG_NAME).is_file():
        raise VitlabError(f"{path} has no {CONFIG_NAME}: not a run directory (expected config.json and "
                          "model.safetensors from save_pretrained)")
    if read_json(path / CONFIG_NAME).get("model_type") in CLIP_MODEL_TYPES:
        from vitlab.clip.zeroshot import load_model_dir

        clip, _, preprocess = load_model_dir(path)
        run = Run(path, clip.vision.to(device).eval(), [], preprocess)
        run.notes.append(f"the image tower of a {clip.kind.upper()} model: no classifier, so no predictions")
        return run
    model = VisionTransformer.from_pretrained(path, map_location=device)
    names = VisionTransformer.read_class_names(path)
    n = model.cfg.num_classes
    if names is None or len(names) != n:
        names = [str(i) for i in range(n)]
    run = Run(path, model, names, run_preprocess(path, image_size=model.cfg.image_size))
    run.metrics = read_metrics(path / METRICS_NAME, run.notes)
    run.confusion = read_eval_confusion(path / EVAL_NAME, n, run.notes)
    return run


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)
