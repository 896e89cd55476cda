"""`preprocessor_config.json`: how to turn any image into the model's input, in Hugging Face's format.

Written in `ViTImageProcessor` style so `transformers.ViTImageProcessor.from_pretrained(run_dir)` reads it
and produces the same pixels as `vitlab predict` (see `vitlab.train.predict.preprocess`).
"""

from __future__ import annotations

from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.weights import read_json, write_json

PREPROCESSOR_NAME = "preprocessor_config.json"
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
