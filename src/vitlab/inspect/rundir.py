"""Read what the trainer leaves in a run directory: model, class names, normalisation, metrics, eval."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.inspect.images import run_preprocess
from vitlab.model.vit import VisionTransformer
from vitlab.preprocess import ImagePreprocess
from vitlab.weights import CONFIG_NAME, read_json

METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"
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
    run.confusion = read_confusion(path / EVAL_NAME, n, run.notes)
    return run


def read_metrics(path: Path, notes: list[str]) -> list[dict]:
    """One dict per line of metrics.jsonl; a half-written last line (run still going) is skipped."""
    if not path.is_file():
        notes.append(f"no {path.name} in the run directory: training curves skipped")
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {i} is not JSON: skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_confusion(path: Path, num_classes: int, notes: list[str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    cm = read_json(path).get("confusion_matrix")
    if cm is None:
        return None
    try:
        cm = torch.tensor(cm, dtype=torch.int64)
    except (TypeError, ValueError):
        cm = None
    if cm is None or cm.shape != (num_classes, num_classes):
        notes.append(f"{path.name}: confusion_matrix is not a {num_classes}x{num_classes} list of counts: ignored")
        return None
    return cm


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)
