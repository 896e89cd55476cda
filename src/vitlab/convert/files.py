"""Reading a checkpoint to convert: where its safetensors files and config.json are, their tensors, and a timm
checkpoint as a vitlab model. Shared by `vitlab convert` and fine-tuning (`vitlab train --init`).

Pickled checkpoints (.bin, .pth, ...) are refused: unpickling can run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, load_state_dict, read_json

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"


def locate(src: Path) -> tuple[list[Path], dict | None]:
    """(safetensors files to read, config.json dict or None) for a file or directory SRC."""
    if not src.exists():
        raise VitlabError(f"{src} not found")
    if src.is_file():
        if src.suffix in PICKLE_SUFFIXES:
            raise VitlabError(f"{src} is a pickled checkpoint; only .safetensors weights are read "
                              "(unpickling can run code): save it with safetensors first")
        if src.suffix != ".safetensors":
            raise VitlabError(f"{src} is not a .safetensors file")
        files, folder = [src], src.parent
    else:
        folder = src
        if (src / WEIGHTS_NAME).is_file():
            files = [src / WEIGHTS_NAME]
        elif (src / INDEX_NAME).is_file():
            shards = sorted(set(read_json(src / INDEX_NAME).get("weight_map", {}).values()))
            if not shards:
                raise VitlabError(f"{src / INDEX_NAME} lists no weight files")
            files = [src / s for s in shards]
        else:
            found = sorted(src.glob("*.safetensors"))
            if len(found) != 1:
                pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if not found and pickles:
                    raise VitlabError(f"{src} holds only pickled checkpoints ({', '.join(pickles)}); "
                                      "only .safetensors weights are read (unpickling can run code)")
                raise VitlabError(f"{src} holds {len(found) or 'no'} .safetensors files; "
                                  f"expected {WEIGHTS_NAME} (or one .safetensors file)")
            files = found
    config = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    return files, config


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of all `files` (shards) in one state dict; a key in two shards is an error."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_state_dict(f)
        if dup := sorted(set(part) & set(state)):
            raise VitlabError(f"{f} repeats keys of another shard: {dup[:5]}")
        state.update(part)
    return state


def convert_timm(state: dict, config: dict | None, *, variant: str | None = None, image_size: int | None = None,
                 num_classes: int | None = None):
    """(vitlab model, class names or None) of a timm state dict, described by timm's config.json or `variant`."""
    from vitlab.convert.timm import from_timm_state_dict, load_timm_checkpoint, timm_config_from_state_dict
    from vitlab.convert.timm_swin import from_timm_swin_state_dict, swin_config_from_state_dict

    config = config or {}
    if config.get("model_type") in ("vitlab_vit", "vitlab_swin"):
        raise VitlabError(f"SRC is already a vitlab model directory (config.json model_type {config['model_type']!r})")
    labels = config.get("label_names")
    if variant:
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        if image_size is None and input_size:
            image_size = int(input_size[-1])
        if variant.startswith("swin-"):
            cfg = swin_config_from_state_dict(state, variant=variant, image_size=image_size,
                                              num_classes=num_classes, global_pool=config.get("global_pool"))
            model = from_timm_swin_state_dict(state, cfg)
        else:
            cfg = timm_config_from_state_dict(state, variant=variant, image_size=image_size,
                                              num_classes=num_classes, global_pool=config.get("global_pool"))
            model = from_timm_state_dict(state, cfg)
    elif config.get("architecture"):
        model = load_timm_checkpoint(state, config, image_size=image_size, num_classes=num_classes)
    else:
        raise VitlabError("no config.json naming a timm architecture next to the weights; "
                          "describe the model with --variant (e.g. --variant Ti/16 --image-size 224)")
    return model, labels if isinstance(labels, list) else None
