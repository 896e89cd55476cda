"""`vitlab convert --from timm|hf SRC OUT_DIR`: timm / Hugging Face ViT weights -> a vitlab model directory.

SRC is a .safetensors file or a directory holding one (model.safetensors, or sharded with
model.safetensors.index.json) next to its config.json. Pickled checkpoints (.bin, .pth, ...)
are refused: unpickling can run code.

timm: a config.json written by timm (`architecture`, `num_classes`, `model_args`) is enough when
timm is installed; otherwise `--variant Ti/16` (+ --image-size, --num-classes) describes the
model and the rest is read off the checkpoint's keys. Hugging Face: config.json of a ViT
(`model_type: vit`) describes it fully.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, load_state_dict, read_json

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert timm or Hugging Face ViT weights into a vitlab model directory",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", choices=("timm", "hf"), required=True,
                   help="library the weights come from")
    p.add_argument("src", help="a .safetensors file, or a directory with model.safetensors and config.json")
    p.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    p.add_argument("--variant", help="(timm) vitlab variant of the checkpoint, e.g. 'Ti/16' or 'B/16', "
                                     "when config.json does not name a timm architecture")
    p.add_argument("--image-size", type=int, help="(timm) training image size; default: from config.json "
                                                  "or the position-embedding table")
    p.add_argument("--num-classes", type=int, help="(timm) classifier size; default: the head's rows")
    p.set_defaults(func=run)


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
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_state_dict(f)
        if dup := sorted(set(part) & set(state)):
            raise VitlabError(f"{f} repeats keys of another shard: {dup[:5]}")
        state.update(part)
    return state


def _convert_timm(state: dict, config: dict | None, args: argparse.Namespace):
    from vitlab.convert.timm import from_timm_state_dict, load_timm_checkpoint, timm_config_from_state_dict

    config = config or {}
    if config.get("model_type") == "vitlab_vit":
        raise VitlabError("SRC is already a vitlab model directory (config.json model_type 'vitlab_vit')")
    labels = config.get("label_names")
    if args.variant:
        image_size = args.image_size
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        if image_size is None and input_size:
            image_size = int(input_size[-1])
        cfg = timm_config_from_state_dict(state, variant=args.variant, image_size=image_size,
                                          num_classes=args.num_classes, global_pool=config.get("global_pool"))
        model = from_timm_state_dict(state, cfg)
    elif config.get("architecture"):
        model = load_timm_checkpoint(state, config, image_size=args.image_size, num_classes=args.num_classes)
    else:
        raise VitlabError("no config.json naming a timm architecture next to the weights; "
                          "describe the model with --variant (e.g. --variant Ti/16 --image-size 224)")
    return model, labels if isinstance(labels, list) else None


def _convert_hf(state: dict, config: dict | None, args: argparse.Namespace):
    from vitlab.convert.hf_vit import from_hf_vit_state_dict

    given = [f for f in ("variant", "image_size", "num_classes") if getattr(args, f) is not None]
    if given:
        raise VitlabError(f"--{given[0].replace('_', '-')} describes timm checkpoints; "
                          "a Hugging Face config.json already describes the model")
    if config is None:
        raise VitlabError(f"no {CONFIG_NAME} next to the weights; Hugging Face conversion needs it")
    model = from_hf_vit_state_dict(state, config)
    id2label = config.get("id2label") or {}
    names = [id2label.get(str(i)) for i in range(model.cfg.num_classes)]
    default = [f"LABEL_{i}" for i in range(len(names))]  # transformers' placeholders are not class names
    return model, names if names and None not in names and names != default else None


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out_dir)
    files, config = locate(src)
    if out.resolve() == files[0].parent.resolve():
        raise VitlabError(f"OUT_DIR {out} is the source directory; write the vitlab model elsewhere")
    state = read_weights(files)
    model, class_names = (_convert_timm if args.source == "timm" else _convert_hf)(state, config, args)
    model.save_pretrained(out, class_names=class_names)
    print(f"converted {args.source} weights {src} -> {out}: {model.summary()}, {model.cfg.num_classes} classes")
    return 0
