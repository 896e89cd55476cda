"""Wall-clock minutes to reach 64/70/80/85/90% CIFAR-10 test top-1 for each training recipe.

    python benchmarks/cifar10_time_to_accuracy.py [RECIPE ...] [--data DIR] [--set KEY=VALUE ...]

Trains each recipe (default: seed fast cpu-hour) with `vitlab.train.train`, exactly as `vitlab train
--recipe NAME` does, on the full training set with the test set evaluated after every epoch. Times come
from the run's metrics.jsonl (`elapsed_s`: from the start of the run, data loading and evaluations
included), so a threshold's time is that of the first epoch whose test top-1 reaches it. Writes
benchmarks/results/cifar10_time_to_accuracy-<recipe>-<date>.json and appends one row per recipe to
benchmarks/RESULTS.md. Run it on a quiet machine: a shared CPU can halve the throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from results_md import RESULTS_MD, append_rows, table_row

from vitlab.cli.train import parse_model_args
from vitlab.train import RECIPES, resolve_recipe, train

THRESHOLDS = (0.64, 0.70, 0.80, 0.85, 0.90)
HERE = Path(__file__).resolve().parent


def minutes_to(rows: list[dict], threshold: float) -> float | None:
    """Minutes at the end of the first epoch whose test top-1 is >= threshold, None if never."""
    for r in rows:
        if r["test_top1"] >= threshold:
            return round(r["elapsed_s"] / 60, 2)
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def benchmark(recipe: str, *, data: str | None, device: str, runs_dir: Path, overrides: dict) -> dict:
    config = resolve_recipe(recipe, **overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{recipe}-{stamp}"
    t0 = time.perf_counter()
    result = train(config, out=run_dir, data=data, device=device, recipe=recipe, overrides=overrides)
    wall = time.perf_counter() - t0
    rows = result.metrics
    record = json.loads((run_dir / "train_config.json").read_text())
    return {
        "benchmark": "cifar10_time_to_accuracy", "recipe": recipe, "overrides": overrides, "date": stamp,
        "minutes_to": {f"{round(t * 100)}%": minutes_to(rows, t) for t in THRESHOLDS},
        "final_test_top1": rows[-1]["test_top1"], "final_test_top5": rows[-1]["test_top5"],
        "best_test_top1": max(r["test_top1"] for r in rows), "epochs": rows[-1]["epoch"],
        "total_minutes": round(wall / 60, 2),
        "train_images_per_sec": round(statistics.median(r["images_per_sec"] for r in rows), 1),
        "params": record["model"]["params"], "model_config": record["model"]["config"],
        "precision": record["plan"]["precision"], "device": record["device"], "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
        "run_dir": str(run_dir), "per_epoch": [{k: r.get(k) for k in ("epoch", "elapsed_s", "test_top1")}
                                               for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", default=["tutorial", "fast", "cpu-hour"], help=f"from {', '.join(RECIPES)}")
    ap.add_argument("--data", help="CIFAR-10 directory (default: $VITLAB_DATA, else the cache)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TrainConfig field for every recipe, e.g. epochs=2 (a quick check)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    args = ap.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    overrides = parse_model_args(args.set)  # same KEY=VALUE parsing as --model-arg

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for recipe in args.recipes:
        res = benchmark(recipe, data=args.data, device=args.device, runs_dir=args.runs_dir, overrides=overrides)
        out = args.out_dir / f"cifar10_time_to_accuracy-{recipe}-{res['date']}.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
        reached = ", ".join(f"{k} {v:.1f} min" if v is not None else f"{k} -" for k, v in res["minutes_to"].items())
        setting = (f"recipe {recipe}{' ' + str(overrides) if overrides else ''}: {res['params'] / 1e6:.2f}M params, "
                   f"{res['epochs']} epochs, {res['precision']}, {res['device']} {res['threads']} threads "
                   f"({res['cpu']})")
        result = (f"final top-1 {res['final_test_top1']:.2%} in {res['total_minutes']:.1f} min, "
                  f"{res['train_images_per_sec']:.0f} img/s; time to {reached}")
        append_rows([table_row(["cifar10_time_to_accuracy", time.strftime("%Y-%m-%d"), setting, result,
                                f"results/{out.name}"])], args.results)
        print(json.dumps({k: res[k] for k in ("recipe", "minutes_to", "final_test_top1", "total_minutes",
                                              "train_images_per_sec")}))


if __name__ == "__main__":
    main()
