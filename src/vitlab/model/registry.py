"""Every vitlab model family by its variant names and its config.json `model_type`: one place that creates or
loads any of them. A family is registered here once; everything above (train, convert, export, inspect) asks."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig, parse_variant
from vitlab.model.hub import seeded
from vitlab.model.swin import SwinConfig, SwinTransformer, parse_swin_variant
from vitlab.model.vit import VisionTransformer
from vitlab.weights import CONFIG_NAME, read_json

# config.json model_type -> class (each a PretrainedMixin with `config_class`)
MODEL_CLASSES: dict[str, type[nn.Module]] = {VisionTransformer.model_type: VisionTransformer,
                                             SwinTransformer.model_type: SwinTransformer}


def model_class(model_type: str) -> type[nn.Module]:
    """The class that reads a vitlab model dir whose config.json says `model_type`."""
    if model_type not in MODEL_CLASSES:
        raise VitlabError(f"model_type {model_type!r} is not a vitlab model; known: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type]


def model_config(variant: str, **overrides) -> ViTConfig | SwinConfig:
    """The config a variant name (+ overrides) stands for: "Ti/4", "conv128", "swin-cifar", ..."""
    if variant.strip().startswith("swin-"):
        return parse_swin_variant(variant.strip(), **overrides)
    return parse_variant(variant, **overrides)


def create_model(variant: str | ViTConfig | SwinConfig = "tutorial", *, seed: int | None = None,
                 **overrides) -> nn.Module:
    """`create_model("Ti/4", image_size=32, num_classes=10)`, `create_model("swin-cifar")`; `seed` makes the
    init reproducible."""
    cfg = variant if not isinstance(variant, str) else model_config(variant, **overrides)
    cls = next(c for c in MODEL_CLASSES.values() if isinstance(cfg, c.config_class))
    with seeded(seed):
        return cls(cfg)


def load_pretrained(directory: str | Path, *, map_location="cpu") -> nn.Module:
    """Any vitlab model dir (config.json + model.safetensors), by the model_type its config.json names."""
    config = Path(directory) / CONFIG_NAME
    if not config.is_file():
        raise VitlabError(f"{directory} is not a model directory: it has no {CONFIG_NAME}")
    model_type = read_json(config).get("model_type", VisionTransformer.model_type)
    return model_class(model_type).from_pretrained(directory, map_location=map_location)
