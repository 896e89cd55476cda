"""`vitlab convert --from timm|hf SRC OUT_DIR`: timm / Hugging Face ViT weights -> a vitlab model directory.

SRC is a .safetensors file or a directory holding one (model.safetensors, or sharded with
model.safetensors.index.json) next to its config.json. Pickled checkpoints (.bin, .pth, ...)
are refused: unpickling can run code.

timm: a config.json written by timm (`architecture`, `num_classes`, `model_args`) is enough when
timm is installed; otherwise `--variant Ti/16` (+ --image-size, --num-classes) describes the
model and the rest is read off the checkpoint's keys. Hugging Face: config.json of a ViT
(`model_type: vit`) or a Swin (`model_type: swin`, becoming a vitlab Swin) describes it fully.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlab.convert.files import convert_timm, locate, read_weights
from vitlab.errors import VitlabError
from vitlab.weights import CONFIG_NAME


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


def _convert_timm(state: dict, config: dict | None, args: argparse.Namespace):
    return convert_timm(state, config, variant=args.variant, image_size=args.image_size, num_classes=args.num_classes)


def _convert_hf(state: dict, config: dict | None, args: argparse.Namespace):
    from vitlab.convert.hf_vit import from_hf_vit_state_dict

    given = [f for f in ("variant", "image_size", "num_classes") if getattr(args, f) is not None]
    if given:
        raise VitlabError(f"--{given[0].replace('_', '-')} describes timm checkpoints; "
                          "a Hugging Face config.json already describes the model")
    if config is None:
        raise VitlabError(f"no {CONFIG_NAME} next to the weights; Hugging Face conversion needs it")
    from vitlab.modeldir import hf_class_names

    if config.get("model_type") == "swin":
        from vitlab.convert.hf_swin import from_hf_swin_state_dict

        model = from_hf_swin_state_dict(state, config)
    else:
        model = from_hf_vit_state_dict(state, config)
    return model, hf_class_names(config, model.cfg.num_classes)


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
