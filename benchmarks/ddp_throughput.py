"""Training images/s of `torchrun` DDP on one CPU: N processes of T threads against one process, at the same
global batch.

    python benchmarks/ddp_throughput.py [--recipe fast] [--train-subset 10240] [--epochs 2]

Each setting is `vitlab train` (or `torchrun --standalone --nproc_per_node N -m vitlab train`) in fresh
processes with OMP_NUM_THREADS=T, `--batch-size` = global batch / N; the number is the last epoch's
images_per_sec in metrics.jsonl (all processes together; the first epoch holds the start-up). Settings:
1 process x 1 thread (the per-process reference), 1 x 2 threads, 2 x 1 thread (gloo). Results:
benchmarks/results/ddp_throughput-*.json and one RESULTS.md row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cifar10_time_to_accuracy import HERE, cpu_name, git_commit, read_rows
from results_md import RESULTS_MD, append_rows, table_row

SETTINGS = ((1, 1), (1, 2), (2, 1))  # (processes, threads each)


def measure(processes: int, threads: int, args: argparse.Namespace, run_dir: Path) -> dict:
    train = ["train", "--recipe", args.recipe, "--train-subset", str(args.train_subset), "--test-subset",
             str(args.test_subset), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size // processes),
             "--out", str(run_dir), "--no-progress", *(["--data", args.data] if args.data else [])]
    launcher = [sys.executable, "-m", "vitlab"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m",
         "vitlab"]
    cmd = [*launcher, *train]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rows = read_rows(run_dir / "metrics.jsonl")
    total = rows[-1]["images_per_sec"]
    return {"processes": processes, "threads": threads, "images_per_sec": round(total, 1),
            "per_process": round(total / processes, 1), "final_test_top1": rows[-1]["test_top1"],
            "command": f"OMP_NUM_THREADS={threads} " + " ".join(
                ["vitlab" if processes == 1 else f"torchrun --standalone --nproc_per_node {processes} -m vitlab",
                 *train])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--train-subset", type=int, default=10240)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="the global batch")
    ap.add_argument("--data", help="CIFAR-10 directory (default: $VITLAB_DATA, else the cache)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench-ddp"))
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [measure(p, t, args, args.runs_dir / f"{stamp}-{p}x{t}") for p, t in SETTINGS]
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "commit": git_commit()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"ddp_throughput-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "ddp_throughput", **env, "recipe": args.recipe,
                               "global_batch": args.batch_size, "runs": results}, indent=2) + "\n")
    value = "; ".join(f"{r['processes']} x {r['threads']} thread(s): {r['images_per_sec']:.0f} img/s "
                      f"({r['per_process']:.0f} per process)" for r in results)
    setting = (f"recipe {args.recipe}, global batch {args.batch_size}, {env['cores']} cores ({env['cpu']}); "
               f"`{results[-1]['command']}`")
    append_rows([table_row(["ddp_throughput", time.strftime("%Y-%m-%d"), setting, value, f"results/{out.name}"])],
                args.results)
    print(value, flush=True)


if __name__ == "__main__":
    main()
