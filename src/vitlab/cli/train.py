"""`vitlab train [--recipe fast] [--data DIR] [--out runs/NAME] [overrides...]`: train a ViT, print test top-1.

Recipes (one table in vitlab/train/recipes.py): tutorial (the blog post's model, ~64%), sprint (3 min), fast
(default, ~15 min on a 2-core CPU), cpu-hour (60 min); sprint-pure, fast-pure, cpu-hour-pure the same for the
patchify ViT (no conv stem); teacher (the CNN to distil from); finetune (with --init). Any field can be
overridden: --epochs 5 --lr 1e-3 --model Ti/4 ...
--time-budget MINUTES fits the number of steps and the schedule to the wall clock instead of --epochs: the
command ends within that many minutes of its start, evaluation and saving included. Without --recipe it
runs the recipe made for that length (sprint up to 5 minutes, fast up to 30, cpu-hour beyond).
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
import os
import time
from collections.abc import Iterable
from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.speed import PRECISIONS
from vitlab.train.guard import stops_on_sigterm
from vitlab.train.recipes import BUDGET_RECIPES, DEFAULT_RECIPE, RECIPES, recipe_for_budget, resolve_recipe

# CLI flag -> RunConfig field: the options `vitlab train` and `vitlab train-clip` share.
RUN_OVERRIDES = {
    "epochs": float, "max_steps": int, "batch_size": int, "lr": float, "min_lr": float, "weight_decay": float,
    "warmup_epochs": float, "grad_clip": float, "ema": float, "precision": str, "seed": int, "time_budget": float,
    "dataset": str, "train_subset": int, "test_subset": int, "eval_batch_size": int,
    "on_nonfinite": str,
    "optimizer": str, "decay": str,
    "checkpoint_every": int,
}
# CLI flag -> TrainConfig field (augmentation fields land in config.augment).
OVERRIDES = {
    "model": str, **RUN_OVERRIDES, "drop_path": float, "val_split": float,
    "label_smoothing": float, "mixup_alpha": float, "cutmix_alpha": float, "mix_prob": float, "policy": str,
    "crop_padding": int,
    "resize_schedule": str, "teacher": str, "teacher_share": float, "distill": str, "distill_alpha": float,
    "distill_tau": float, "tta": str,
    "data_mode": str, "image_size": int, "workers": int, "memory_share": float, "init": str, "variant": str,
    "layer_decay": float,
}
HELP = {
    "model": "model variant, e.g. tutorial, cifar128, Ti/4, S/4; cnn or cnn-W1-W2-W3 for the CNN teacher",
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
    "optimizer": "adamw | muon (torch's Muon for the hidden matrices, q/k/v apart; AdamW for the rest)",
    "decay": "cosine | linear: the learning rate's decay to --min-lr after warmup",
    "resize_schedule": "progressive resizing, SIZE:UNTIL,...: e.g. 16:0.4,24:0.7 trains at 16 px for the first 40%% "
                       "of the steps, at 24 px until 70%%, then at full size",
    "teacher": "distil from this CNN teacher run dir (vitlab train --recipe teacher), or 'stage' to train one "
               "first, inside the time budget",
    "teacher_share": "with --teacher stage under a time budget: the budget's share the teacher gets",
    "distill": "hard | soft (DeiT); through the model's distillation token when it has one",
    "distill_alpha": "soft distillation: weight of the teacher term",
    "distill_tau": "soft distillation: temperature",
    "tta": "none | flip | flip-translate: the final evaluation also reports test_top1_tta",
    "checkpoint_every": "also checkpoint every N optimizer steps inside an epoch (long epochs; a torchrun "
                        "restart goes on from there); 0: at epoch ends only",
    "data_mode": "image folders: memory (decoded once, held in memory) | stream (read from disk by DataLoader "
                 "workers, for folders larger than memory) | auto (default: memory if it fits --memory-share)",
    "image_size": "image folders: side the images are resized / cropped to (default 32)",
    "workers": "--data-mode stream: decoding processes per training process (default 2)",
    "memory_share": "--data-mode auto: stream when the decoded folder would need more than this share of the "
                    "available memory (default 0.5)",
    "init": "fine-tune from pretrained weights: a vitlab run or model dir, a Hugging Face ViT / CLIP / SigLIP "
            "dir, or a timm .safetensors file (with timm's config.json, or --variant); the head is replaced "
            "for new classes, positions resampled for a new image size",
    "variant": "with --init of a bare timm .safetensors file (no config.json): its vitlab variant, e.g. Ti/16",
    "layer_decay": "layer-wise learning-rate decay, e.g. 0.75: each layer below the head learns 0.75x slower "
                   "(0: off)",
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
    down = p.add_mutually_exclusive_group()
    down.add_argument("--download", action="store_const", const=True, default=None,
                      help="download CIFAR into --data / $VITLAB_DATA too if it is not there (default: only into "
                           "the cache dir, ~/.cache/vitlab)")
    down.add_argument("--no-download", action="store_const", const=False, dest="download",
                      help="never download: fail when the data is not found")
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


def check_init(args: argparse.Namespace, overrides: dict) -> None:
    """--init SRC as an absolute path (a resumed run finds it from anywhere); the recipes that need it."""
    from vitlab.train.recipes import NEEDS_INIT

    if overrides.get("init"):
        overrides["init"] = str(Path(overrides["init"]).expanduser().absolute())
    elif args.resume is None and getattr(args, "recipe", None) in NEEDS_INIT:
        raise VitlabError(f"--recipe {args.recipe} fine-tunes pretrained weights: give them with --init SRC")


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
    """runs/<name>-<time>; under torchrun runs/<name>-<its run id>, the same on every rank and in a restart."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S') if run_id == 'none' else run_id}"


def is_main_process() -> bool:
    """False on torchrun's ranks > 0 (only rank 0 prints the result)."""
    from vitlab.train.distributed import detect

    return detect().is_main


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a ViT from scratch (CIFAR-10 by default)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    by_budget = ", ".join(f"{name} up to {bound:g} min" for bound, name in BUDGET_RECIPES[:-1])
    p.add_argument("--recipe", help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE}; with --time-budget N "
                   f"the one made for N minutes: {by_budget}, {BUDGET_RECIPES[-1][1]} beyond)")
    add_run_arguments(p)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="ViTConfig override for the model, e.g. width=128 (repeatable)")
    add_overrides(p, OVERRIDES)
    p.add_argument("--no-flip", action="store_const", const=False, dest="flip", help="no horizontal flips")
    p.add_argument("--alternate-flip", action="store_const", const=True, default=None,
                   help="flip each image in every other epoch (airbench) instead of at random")
    p.add_argument("--compile", action="store_const", const=True, default=None, help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in backward (less memory, slower)")
    p.add_argument("--freeze-backbone", action="store_const", const=True, default=None,
                   help="with --init: train the classifier only (a linear probe)")
    p.add_argument("--allow-empty-classes", action="store_const", const=True, default=None,
                   help="image folders: keep a train/ class folder with no images as a class (warned) instead of "
                        "refusing")
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
    overrides = chosen(args, (*OVERRIDES, "flip", "alternate_flip", "compile", "grad_checkpointing", "tensorboard",
                              "freeze_backbone", "allow_empty_classes"))
    if args.recipe is None and args.resume is None:
        args.recipe = recipe_for_budget(overrides.get("time_budget"))
    check_init(args, overrides)
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
    if is_main_process():
        print(f"test top-1 {final['test_top1']:.2%}  top-5 {final['test_top5']:.2%}  after {final['epoch']} epochs "
              f"({final['elapsed_s'] / 60:.1f} min)  run: {result.run_dir}")
    return 0
