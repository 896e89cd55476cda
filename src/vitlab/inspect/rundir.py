"""What `vitlab explain` reads from a run directory: the opened model (`vitlab.modeldir`), metrics and eval.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.modeldir import open_model_dir
from vitlab.preprocess import ImagePreprocess
from vitlab.rundir import EVAL_NAME, METRICS_NAME, read_eval_confusion, read_metrics


@dataclass
class Run:
    path: Path
    model: nn.Module  # a VisionTransformer (a CLIP / SigLIP dir: its image tower), or another registry family's
    class_names: list[str]
    preprocess: ImagePreprocess  # resize + normalise as in training (preprocessor_config.json)
    metrics: list[dict] = field(default_factory=list)  # one dict per epoch, from metrics.jsonl
    confusion: torch.Tensor | None = None  # (classes, classes) counts, rows = true class, from eval.json
    notes: list[str] = field(default_factory=list)  # what was missing or skipped, for the report


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by `vitlab train`, or any model dir `vitlab.modeldir.open_model_dir` opens.

    A CLIP/SigLIP model directory works too: its image tower (a ViT without classifier) is explained.
    """
    md = open_model_dir(path, tokenizer=False)  # a CLIP / SigLIP dir: its image tower is explained
    if md.kind == "teacher":
        raise VitlabError(f"{md.path} holds a CNN teacher: vitlab explain draws a transformer's attention, which a "
                          "CNN has not (predict and eval take it)")
    if md.is_clip:
        run = Run(md.path, md.model.vision.to(device).eval(), [], md.preprocess, notes=md.notes)
        run.notes.append(f"the image tower of a {md.kind.upper()} model: no classifier, so no predictions")
        return run
    run = Run(md.path, md.model.to(device), md.labels, md.preprocess, notes=md.notes)
    run.metrics = read_metrics(md.path / METRICS_NAME, run.notes)
    run.confusion = read_eval_confusion(md.path / EVAL_NAME, md.num_classes, run.notes)
    return run


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)
