"""`vitlab train [--recipe fast] [--data DIR] [--out runs/NAME] [overrides...]`: train a ViT, print test top-1.

Recipes (one table in vitlab/train/recipes.py): tutorial (the blog post's model, ~64%), sprint (3 min), fast
(default, ~15 min on a 2-core CPU), cpu-hour (60 min); sprint-pure, fast-pure, cpu-hour-pure the same for the
patchify ViT (no conv stem); swin-sprint (3 min), swin-fast (15 min) for the Swin Transformer (swin-cifar);
teacher (the CNN to distil from); finetune (with --init). Every field of the recipe's TrainConfig is a flag
(below) that overrides it: --epochs 5 --lr 1e-3 --model Ti/4 ...
--time-budget MINUTES fits the number of steps and the schedule to the wall clock instead of --epochs: the
command ends within that many minutes of its start, evaluation and saving included. Without --recipe it
runs the recipe made for that length (sprint up to 5 minutes, fast up to 30, cpu-hour beyond; with --model
swin-*: swin-sprint up to 5, swin-fast beyond).
--resume RUN_DIR continues an interrupted run exactly where its last checkpoint left it.
Exit codes: 0 done; 2 bad input, a full disk, a run dir in use by another process, or a run that diverged
(NaN/Inf loss: its last good checkpoint is kept; see --on-nonfinite); 130 Ctrl-C; 143 SIGTERM. After 130,
143 or a full disk, --resume RUN_DIR continues the run.

The run dir gets config.json + model.safetensors (load with vitlab.model.load_pretrained(RUN_DIR)),
preprocessor_config.json, train_config.json, metrics.jsonl / metrics.csv, steps.jsonl, curves.png and
checkpoint/. Data: --data DIR, else $VITLAB_DATA, else ~/.cache/vitlab/<dataset>.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vitlab.cli._flags import add_config_flags, given
from vitlab.errors import VitlabError
from vitlab.train.guard import stops_on_sigterm
from vitlab.train.recipes import (
    BUDGET_RECIPES,
    DEFAULT_RECIPE,
    RECIPES,
    TrainConfig,
    recipe_for_budget,
    resolve_recipe,
)

# Older flag names that differ from their field's.
ALIASES = {"model_args": "--model-arg"}


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
    add_config_flags(p, TrainConfig, aliases=ALIASES)
    p.set_defaults(func=run)


@stops_on_sigterm  # exit 143, resumable (vitlab.train.guard)
def run(args: argparse.Namespace) -> int:
    from vitlab.train import resume, train
    from vitlab.train.budget import process_start

    progress = not args.no_progress
    overrides = given(args, TrainConfig)
    if args.recipe is None and args.resume is None:
        args.recipe = recipe_for_budget(overrides.get("time_budget"), overrides.get("model"))
    check_init(args, overrides)
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
