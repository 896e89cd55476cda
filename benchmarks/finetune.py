"""Fine-tuning pays: pretrain on CIFAR-10's 6 animal classes, then learn its 4 vehicle classes from 100 images
per class — fine-tune vs linear probe vs training from scratch, at equal wall clock.

    python benchmarks/finetune.py [--pretrain-minutes 5] [--minutes 2] [--per-class 100]

Writes two image folders from the real CIFAR-10 (PNG, lossless; outside the repo, --work): `animals`
(bird, cat, deer, dog, frog, horse: all 30,000 training and 6,000 test images) and `vehicles` (airplane,
automobile, ship, truck: the first --per-class training images of each, all 4,000 test images). Then, each
`vitlab train` in a fresh process as a user runs it:
- pretrain: `--recipe sprint --dataset folder --data animals --time-budget P`;
- fine-tune: `--recipe finetune --init PRETRAINED --dataset folder --data vehicles --time-budget M`;
- linear probe: the same with `--freeze-backbone --lr 1e-2`;
- from scratch: `--recipe sprint --dataset folder --data vehicles --time-budget M --batch-size 64` (the
  same model, randomly initialised, with the recipe made for short runs at the fine-tuning batch).
Reports the final test top-1 on the vehicles of each; the pretraining time is reported apart (it is spent
once). Results: benchmarks/results/finetune-*.json and rows in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cifar10_time_to_accuracy import HERE, cpu_name, git_commit, run
from PIL import Image
from results_md import RESULTS_MD, append_rows, table_row

from vitlab.data import load_cifar10

ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
VEHICLES = ("airplane", "automobile", "ship", "truck")


def write_folder(root: Path, classes: tuple[str, ...], *, data: str | None, per_class: int = 0) -> Path:
    """root/{train,test}/<class>/NNNNN.png from the real CIFAR-10 (reused when already complete)."""
    done = root / "complete"
    if done.is_file():
        return root
    for split in ("train", "test"):
        ds = load_cifar10(data, split)
        for name in classes:
            label = ds.classes.index(name)
            index = (ds.labels == label).nonzero().flatten()
            if split == "train" and per_class:
                index = index[:per_class]
            out = root / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in index.tolist():
                Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(out / f"{i:05d}.png")
    done.write_text("ok\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-minutes", type=float, default=5.0)
    ap.add_argument("--minutes", type=float, default=2.0, help="time budget of each vehicle run")
    ap.add_argument("--per-class", type=int, default=100, help="vehicle training images per class")
    ap.add_argument("--data", help="CIFAR-10 directory (default: $VITLAB_DATA, else the cache)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-finetune"), help="folders and run dirs")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    animals = write_folder(args.work / "animals", ANIMALS, data=args.data)
    vehicles = write_folder(args.work / f"vehicles-{args.per_class}", VEHICLES, data=args.data,
                            per_class=args.per_class)
    folder = ["--dataset", "folder"]
    budget = ["--time-budget", f"{args.minutes:g}"]
    runs = args.work / stamp
    pre = run("sprint", [*folder, "--time-budget", f"{args.pretrain_minutes:g}"], run_dir=runs / "pretrain",
              data=str(animals))
    cases = {
        "fine-tune": ("finetune", [*folder, *budget, "--init", str(runs / "pretrain")]),
        "linear probe": ("finetune", [*folder, *budget, "--init", str(runs / "pretrain"), "--freeze-backbone",
                                      "--lr", "1e-2"]),
        "from scratch": ("sprint", [*folder, *budget, "--batch-size", "64"]),  # 400 images: the fine-tune batch
    }
    results = {name: run(recipe, flags, run_dir=runs / name.replace(" ", "-"), data=str(vehicles))
               for name, (recipe, flags) in cases.items()}
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit()}
    out = args.out_dir / f"finetune-{stamp}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "finetune", **env, "per_class": args.per_class, "pretrain": pre,
                               "runs": results}, indent=2) + "\n")
    setting = (f"pretrain `sprint` on the 6 animal classes ({args.pretrain_minutes:g} min: "
               f"{pre['final_test_top1']:.2%} on their test set), then the 4 vehicle classes from "
               f"{args.per_class} images each, {args.minutes:g} min per run, {env['threads']} threads")
    value = "; ".join(f"{name} {res['final_test_top1']:.2%} (`{res['command']}`)" for name, res in results.items())
    append_rows([table_row(["finetune", time.strftime("%Y-%m-%d"), setting, value, f"results/{out.name}"])],
                args.results)
    print(json.dumps({name: res["final_test_top1"] for name, res in results.items()}), flush=True)


if __name__ == "__main__":
    main()
