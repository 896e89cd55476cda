"""A model directory to export or explore: a vitlab ViT (training run, `vitlab convert` output) or CLIP / SigLIP dir."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vitlab.inspect.rundir import CLIP_MODEL_TYPES, load_run
from vitlab.preprocess import ImagePreprocess
from vitlab.weights import CONFIG_NAME, read_json


@dataclass
class ModelDir:
    path: Path
    kind: str  # "vit" (an image classifier or feature extractor) | "clip" | "siglip"
    model: nn.Module  # VisionTransformer, or vitlab.clip.CLIPModel
    preprocess: ImagePreprocess  # what turns an image into this model's input
    class_names: list[str] | None = None  # ViT classifiers: id2label of config.json, None when it has none
    tokenizer: object | None = None  # CLIP / SigLIP: texts -> input_ids


def open_model_dir(path: str | Path) -> ModelDir:
    """Load a vitlab model directory (config.json + model.safetensors) in eval mode on the CPU.

    Preprocessing: ViT dirs as `vitlab predict` does (the run's preprocessor_config.json with Pillow
    resampling; without the file, resize + mean/std 0.5); CLIP / SigLIP dirs as `vitlab zeroshot`.
    """
    path = Path(path)
    config = path / CONFIG_NAME
    if config.is_file() and read_json(config).get("model_type") in CLIP_MODEL_TYPES:
        from vitlab.clip.zeroshot import load_model_dir

        model, tokenizer, preprocess = load_model_dir(path)
        return ModelDir(path, model.kind, model.eval(), preprocess, tokenizer=tokenizer)
    from vitlab.model import VisionTransformer

    run = load_run(path)  # checks the directory, reads weights, class names and preprocessing
    pre = dataclasses.replace(run.preprocess, backend="pil")  # predict resamples with Pillow
    names = VisionTransformer.read_class_names(path) and run.class_names  # None: the dir names no classes
    return ModelDir(path, "vit", run.model.eval(), pre, class_names=names)
