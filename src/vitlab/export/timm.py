"""`--to timm`: model.safetensors + a timm hub-style config.json (`architecture`, `model_args`, `pretrained_cfg`).

timm reads it as `timm.create_model("local-dir:OUT", pretrained=True)`, or as
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=OUT/model.safetensors,
num_classes=N), **model_args)`, or with `checkpoint_path=`; all load strictly. `vitlab convert --from timm`
reads it back. The architecture is a registered name of the right timm class; `model_args` override every
one of its defaults, so it need not match the model's size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.modeldir import ModelDir
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, save_state_dict, write_json

# timm class -> a registered architecture of it
ARCHITECTURES = {"VisionTransformer": "vit_base_patch16_224",
                 "VisionTransformerDistilled": "deit_base_distilled_patch16_224",
                 "SwinTransformer": "swin_tiny_patch4_window7_224"}
TIMM_LAYERNORM_EPS = 1e-6  # what timm's ViT builds when model_args name no norm_layer (its Swin: 1e-5)


def timm_hub_config(src: ModelDir) -> dict:
    """The config.json timm's `push_to_hf_hub` would write for this model."""
    from vitlab.convert.timm import timm_kwargs
    from vitlab.convert.timm_swin import TIMM_LAYERNORM_EPS as SWIN_EPS
    from vitlab.model.swin import SwinTransformer

    swin = isinstance(src.model, SwinTransformer)
    if src.kind != "vit" and not swin:
        raise VitlabError(f"timm's format holds image classifiers; a {src.kind.upper()} dir exports to hf or onnx")
    cfg, pre = src.model.cfg, src.preprocess
    kwargs = timm_kwargs(cfg)  # raises for what timm's VisionTransformer cannot express
    kwargs.pop("norm_layer")  # a Python object; only the eps matters and JSON cannot name one
    eps, family = (SWIN_EPS, "Swin") if swin else (TIMM_LAYERNORM_EPS, "ViT")
    if not math.isclose(cfg.norm_eps, eps, rel_tol=1e-9):
        raise VitlabError(f"norm_eps={cfg.norm_eps:g}: a timm config.json cannot name a LayerNorm eps, and timm's "
                          f"{family} uses {eps:g}")
    if not math.isclose(pre.rescale_factor, 1 / 255):
        raise VitlabError(f"rescale_factor={pre.rescale_factor}: timm's transforms scale pixels by 1/255")
    if swin:
        classifier, arch = "head.fc", "SwinTransformer"
    else:
        classifier = ["head", "head_dist"] if cfg.distill_token and cfg.num_classes else "head"
        arch = "VisionTransformerDistilled" if cfg.distill_token else "VisionTransformer"
    config = {
        "architecture": ARCHITECTURES[arch],
        "num_classes": cfg.num_classes,
        "num_features": src.model.num_features,
        "global_pool": kwargs["global_pool"],
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": "vitlab", "custom_load": False,
            "input_size": [cfg.in_channels, cfg.image_size, cfg.image_size], "fixed_input_size": False,
            "interpolation": pre.resample,
            # square: resize both sides ("squash"); shortest edge: resize it, then crop the centre
            "crop_pct": 1.0 if pre.crop_size is None else pre.crop_size / pre.size,
            "crop_mode": "squash" if pre.resize == "square" else "center",
            "mean": list(pre.mean), "std": list(pre.std), "num_classes": cfg.num_classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": classifier,
        },
    }
    if src.class_names:
        config["label_names"] = list(src.class_names)
    json.dumps(config)  # every value must be plain JSON: raise here, not half-way through writing
    return config


def export_timm(src: ModelDir, out: Path) -> list[str]:
    from vitlab.convert.timm import to_timm

    config = timm_hub_config(src)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(to_timm(src.model), out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config)  # last: a directory with a config.json is complete
    return []


@torch.no_grad()
def check_timm(src: ModelDir, out: Path) -> float | None:
    """Max |logit difference| of timm's model (loaded strictly from OUT) from ours; None without timm."""
    try:
        import timm
    except ImportError:
        return None
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = src.model.cfg
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    return float((theirs(x) - src.model(x)).abs().max())
