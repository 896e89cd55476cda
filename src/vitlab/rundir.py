"""What a run dir holds: its file names, the preprocessor config and the eval.json schema (writer + reader).

`preprocessor_config.json` says how to turn any image into the model's input, in Hugging Face's format:
written in `ViTImageProcessor` style so `transformers.ViTImageProcessor.from_pretrained(run_dir)` reads it
and produces the same pixels as `vitlab predict` (see `vitlab.modeldir.run_preprocess`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, read_json, write_json

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME"]  # re-exported: every run-dir name is importable from here
PREPROCESSOR_NAME = "preprocessor_config.json"
RUN_CONFIG = "train_config.json"  # the resolved config + plan + data info, in every run dir
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"
CONFUSION_PNG = "confusion.png"
LOCK_NAME = ".vitlab-lock"  # the trainer's lock (vitlab.train.lock)
CHECKPOINT_DIR = "checkpoint"
EXPORT_RECORD = "vitlab_export.json"  # in an export dir: its format and the files it wrote
RUN_MARKS = (LOCK_NAME, RUN_CONFIG, METRICS_NAME, CHECKPOINT_DIR)  # any of these: a run dir, never a target
EVAL_CONFUSION_KEY = "confusion"  # eval.json: (classes, classes) counts, rows = true class
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF configs store
REQUIRED = ("size", "image_mean", "image_std")


def write_preprocessor_config(run_dir: str | Path, *, image_size: int, mean: tuple[float, ...],
                              std: tuple[float, ...]) -> Path:
    """Resize to image_size x image_size (bicubic), scale to [0, 1], normalise with the training mean/std."""
    path = Path(run_dir) / PREPROCESSOR_NAME
    write_json(path, {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": int(image_size), "width": int(image_size)},
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    })
    return path


def read_preprocessor_config(run_dir: str | Path) -> dict:
    """The run's preprocessor config with defaults filled in; errors name the missing key."""
    path = Path(run_dir) / PREPROCESSOR_NAME
    cfg = read_json(path)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise VitlabError(f"{path} lacks {', '.join(missing)}")
    size = cfg["size"]
    if not (isinstance(size, dict) and "height" in size and "width" in size):
        raise VitlabError(f"{path}: size must be {{'height': H, 'width': W}}, got {size!r}")
    if len(cfg["image_mean"]) != 3 or len(cfg["image_std"]) != 3:
        raise VitlabError(f"{path}: image_mean and image_std need 3 values each")
    defaults = {"do_convert_rgb": True, "do_resize": True, "resample": BICUBIC, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True}
    return {**defaults, **cfg}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the dir's model.safetensors: eval.json names the weights it scored."""
    return sha256_file(Path(model_dir) / WEIGHTS_NAME)


def write_eval(path: str | Path, record: dict, confusion: torch.Tensor) -> Path:
    """Write an eval.json: `record` (top1, per_class, weights_sha256, step, ...) plus the confusion counts."""
    path = Path(path)
    write_json(path, {**record, EVAL_CONFUSION_KEY: confusion.tolist()})
    return path


def read_eval_confusion(path: str | Path, num_classes: int, notes: list[str]) -> torch.Tensor | None:
    """The (classes, classes) confusion counts of an eval.json, or None (a note says why when it is unusable)."""
    path = Path(path)
    if not path.is_file():
        return None
    cm = read_json(path).get(EVAL_CONFUSION_KEY)
    if cm is None:
        notes.append(f"{path.name} has no {EVAL_CONFUSION_KEY!r}: confusion matrix not read from it")
        return None
    try:
        cm = torch.tensor(cm, dtype=torch.int64)
    except (TypeError, ValueError):
        cm = None
    if cm is None or cm.shape != (num_classes, num_classes):
        notes.append(f"{path.name}: {EVAL_CONFUSION_KEY} is not a {num_classes}x{num_classes} list of counts: ignored")
        return None
    return cm


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
