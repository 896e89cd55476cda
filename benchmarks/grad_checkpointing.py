"""Gradient checkpointing: peak memory and speed of a training step with and without it.

    python benchmarks/grad_checkpointing.py --model S/4 --batch-size 512

Each setting runs in its own process (peak RSS is per process, from getrusage) with vitlab's default
training path; reports peak memory above the model's baseline and img/s. Writes
benchmarks/results/grad_checkpointing.json and a row in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from results_md import append_rows

HERE = Path(__file__).parent

CHILD = r"""
import json, resource, sys, time, torch
from vitlab.bench import train_step_fn
from vitlab.model import create_model
from vitlab.speed import default_mode
variant, batch, steps, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
model = create_model(variant, image_size=32, num_classes=10, seed=0)
model.set_grad_checkpointing(ckpt)
fn = train_step_fn(model, **default_mode(torch.device("cpu")), batch_size=batch, image_size=32, num_classes=10)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn()  # first step allocates optimizer state; the peak of later steps is the steady state
times = []
for _ in range(steps):
    t = time.perf_counter(); fn().item(); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mib": peak / 1024, "base_rss_mib": base / 1024, "step_s": sorted(times)}))
"""


def run(variant: str, batch: int, steps: int, ckpt: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(batch), str(steps), "1" if ckpt else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="S/4")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    res = {}
    for ckpt in (False, True):
        r = run(args.model, args.batch_size, args.steps, ckpt)
        r["activation_mib"] = r["peak_rss_mib"] - r["base_rss_mib"]
        r["images_per_sec_median"] = args.batch_size / r["step_s"][len(r["step_s"]) // 2]
        res["checkpointing" if ckpt else "plain"] = r
        print(("checkpointing" if ckpt else "plain"), json.dumps(r), flush=True)
    plain, ck = res["plain"], res["checkpointing"]
    summary = {"memory_ratio": plain["activation_mib"] / ck["activation_mib"],
               "peak_ratio": plain["peak_rss_mib"] / ck["peak_rss_mib"],
               "slowdown": plain["images_per_sec_median"] / ck["images_per_sec_median"] - 1}
    out = {"date": datetime.date.today().isoformat(), "model": args.model, "batch_size": args.batch_size,
           "runs": res, "summary": summary}
    path = HERE / "results" / "grad_checkpointing.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    append_rows([f"| grad_checkpointing | {out['date']} | {args.model}, batch {args.batch_size}, default training "
                f"path | peak RSS {plain['peak_rss_mib']:.0f} -> {ck['peak_rss_mib']:.0f} MiB "
                f"({summary['peak_ratio']:.2f}x; above baseline {plain['activation_mib']:.0f} -> "
                f"{ck['activation_mib']:.0f} MiB, {summary['memory_ratio']:.2f}x), "
                f"{plain['images_per_sec_median']:.0f} -> {ck['images_per_sec_median']:.0f} img/s "
                 f"({100 * summary['slowdown']:.0f}% slower) | results/grad_checkpointing.json |"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
