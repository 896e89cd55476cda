"""`vitlab train [--recipe fast] [--data DIR] [--out runs/NAME] [overrides...]`: train a ViT, print test top-1.

Recipes (one table in vitlab/train/recipes.py): tutorial (the blog post's model, ~64%), fast (default, ~15 min on
a 2-core CPU), cpu-hour (~60 min). Any field can be overridden: --epochs 5 --lr 1e-3 --model Ti/4 ...
--time-budget MINUTES fits the number of steps and the schedule to the wall clock instead of --epochs: the
command ends within that many minutes of its start, evaluation and saving included.
--resume RUN_DIR continues an interrupted run exactly where its last checkpoint left it.
Exit codes: 0 done; 2 bad input, a full disk, a run dir in use by another process, or a run that diverged
(NaN/Inf loss: its last good checkpoint is kept; see --on-nonfinite); 130 Ctrl-C; 143 SIGTERM. After 130,
143 or a full disk, --resume RUN_DIR continues the run.

The run dir gets config.json + model.safetensors (load with VisionTransformer.from_pretrained(RUN_DIR)),
preprocessor_config.json, train_config.json, metrics.jsonl / metrics.csv, steps.jsonl, curves.png and
checkpoint/. Data: --data DIR, else $VITLAB_DATA, else ~/.cache/vitlab/<dataset>.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.speed import PRECISIONS
from vitlab.train.guard import stops_on_sigterm
from vitlab.train.recipes import DEFAULT_RECIPE, RECIPES, resolve_recipe

# CLI flag -> RunConfig field: the options `vitlab train` and `vitlab train-clip` share.
RUN_OVERRIDES = {
    "epochs": float, "max_steps": int, "batch_size": int, "lr": float, "min_lr": float, "weight_decay": float,
    "warmup_epochs": float, "grad_clip": float, "ema": float, "precision": str, "seed": int, "time_budget": float,
    "dataset": str, "train_subset": int, "test_subset": int, "eval_batch_size": int,
    "on_nonfinite": str,
}
# CLI flag -> TrainConfig field (augmentation fields land in config.augment).
OVERRIDES = {
    "model": str, **RUN_OVERRIDES, "drop_path": float, "val_split": float,
    "label_smoothing": float, "mixup_alpha": float, "cutmix_alpha": float, "mix_prob": float, "policy": str,
    "crop_padding": int,
}
HELP = {
    "model": "model variant, e.g. seed, Ti/4, S/4 (drops the recipe's --model-arg reshaping)",
    "epochs": "passes over the training set (fractions allowed)",
    "max_steps": "stop after this many optimizer steps (the schedule ends there too)",
    "lr": "peak learning rate after warmup (AdamW)",
    "min_lr": "learning rate at the end of the cosine",
    "weight_decay": "decoupled weight decay (not on norms, biases, tokens, positions)",
    "drop_path": "stochastic depth of the last block",
    "grad_clip": "max global gradient norm (0: off)",
    "on_nonfinite": "stop (default): a NaN/Inf loss or gradient norm ends the run, exit 2, its last good "
                    "checkpoint kept | skip: skip that step and halve the learning rate (5 in a row: stop)",
    "ema": "EMA decay of the weights, e.g. 0.999 (0: off); the EMA is evaluated and saved",
    "precision": f"{' | '.join(PRECISIONS)}: auto = bf16-pure on CPUs with bf16 matmuls, bf16 autocast on GPUs",
    "val_split": "fraction of train held out as a validation set, e.g. 0.1",
    "time_budget": "minutes from the start of the command to its end (evaluation and saving included): "
                   "steps and schedule are fitted to them instead of --epochs",
    "dataset": "cifar10 | cifar100 | folder",
    "train_subset": "train on the first N images only (quick checks)",
    "test_subset": "evaluate on the first N test images only",
    "label_smoothing": "label smoothing of the targets",
    "mixup_alpha": "mixup Beta(alpha, alpha); 0: off",
    "cutmix_alpha": "cutmix Beta(alpha, alpha); 0: off",
    "policy": "augmentation policy: none | trivial | randaug",
    "crop_padding": "random-crop padding in pixels (0: no crop)",
}


def add_overrides(p: argparse.ArgumentParser, overrides: dict[str, type], *, help: dict[str, str] | None = None,
                  aliases: dict[str, str] | None = None) -> None:
    """One --flag-name per config field, default None (= the recipe's or the config's value)."""
    texts = {**HELP, **(help or {})}
    for name, typ in overrides.items():
        flags = ["--" + name.replace("_", "-"), *([aliases[name]] if aliases and name in aliases else [])]
        p.add_argument(*flags, type=typ, dest=name, default=None, help=texts.get(name))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Data, run dir, resuming, device, progress: the same in `train` and `train-clip`."""
    p.add_argument("--data", help="dataset directory (default: $VITLAB_DATA, else the cache dir)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is not found")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_const", const=True, default=None,
                   help="also write TensorBoard event files to RUN_DIR/tb (pip install 'vitlab[tensorboard]')")


def chosen(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """The overrides given on the command line (flags left at None are not)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def refuse_overrides_on_resume(args: argparse.Namespace, overrides: dict) -> None:
    if not args.resume.strip():
        raise VitlabError("--resume needs the run directory to continue")
    if overrides or args.out is not None:
        flags = ", ".join("--" + k.replace("_", "-") for k in [*overrides, *(["out"] if args.out is not None else [])])
        raise VitlabError(f"--resume continues {args.resume} with its saved settings; drop {flags}")


def out_dir(out: str | None, name: str) -> Path:
    """--out, else `default_out(name)`; an empty --out, or one that names a file, is a one-line error."""
    if out is None:
        return default_out(name)
    if not out.strip():
        raise VitlabError("--out needs a directory (leave it out for runs/<name>-<time>)")
    if Path(out).exists() and not Path(out).is_dir():
        raise VitlabError(f"--out {out} is a file, not a directory")
    return Path(out)


def default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a ViT from scratch (CIFAR-10 by default)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE})")
    add_run_arguments(p)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="ViTConfig override for the model, e.g. width=128 (repeatable)")
    add_overrides(p, OVERRIDES)
    p.add_argument("--no-flip", action="store_const", const=False, dest="flip", help="no horizontal flips")
    p.add_argument("--compile", action="store_const", const=True, default=None, help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in backward (less memory, slower)")
    p.set_defaults(func=run)


def parse_model_args(items: list[str]) -> dict:
    """["width=128", "qkv_bias=false"] -> {"width": 128, "qkv_bias": False}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VitlabError(f"--model-arg wants KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


@stops_on_sigterm  # exit 143, resumable (vitlab.train.guard)
def run(args: argparse.Namespace) -> int:
    from vitlab.train import resume, train
    from vitlab.train.budget import process_start

    progress = not args.no_progress
    overrides = chosen(args, (*OVERRIDES, "flip", "compile", "grad_checkpointing", "tensorboard"))
    if args.model_arg:
        overrides["model_args"] = parse_model_args(args.model_arg)
    if args.resume is not None:
        refuse_overrides_on_resume(args, overrides)
        result = resume(args.resume, data=args.data, device=args.device, progress=progress,
                        started_at=process_start())
    else:
        config = resolve_recipe(args.recipe, **overrides)
        result = train(config, out=out_dir(args.out, args.recipe), data=args.data, device=args.device,
                       progress=progress, download=args.download, recipe=args.recipe, overrides=overrides,
                       started_at=process_start())
    final = result.final
    if not final:
        raise VitlabError(f"{result.run_dir}: no epoch was completed")
    print(f"test top-1 {final['test_top1']:.2%}  top-5 {final['test_top5']:.2%}  after {final['epoch']} epochs "
          f"({final['elapsed_s'] / 60:.1f} min)  run: {result.run_dir}")
    return 0
