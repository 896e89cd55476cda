"""Does the fast mode learn as well as fp32? The same short run (same seed, data order, augmentation) in
fp32, bf16 autocast and bf16-pure, with the final CIFAR-10 test top-1 and throughput of each.

    python benchmarks/precision_accuracy.py --recipe seed --epochs 5

Writes benchmarks/results/precision_accuracy.json and a row in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch
from results_md import append_rows

from vitlab.train import resolve_recipe, train

HERE = Path(__file__).parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tutorial")
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "bf16-pure"])
    p.add_argument("--data", default=None)
    args = p.parse_args()
    out = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "recipe": args.recipe,
           "epochs": args.epochs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            cfg = resolve_recipe(args.recipe, epochs=args.epochs, precision=precision)
            res = train(cfg, out=Path(tmp) / precision, data=args.data, progress=False)
            rows = res.metrics
            out["runs"][precision] = {
                "test_top1": res.test_top1, "test_loss": rows[-1]["test_loss"],
                "train_images_per_sec_median": sorted(r["images_per_sec"] for r in rows)[len(rows) // 2],
                "elapsed_min": rows[-1]["elapsed_s"] / 60, "curve_top1": [r["test_top1"] for r in rows]}
            print(precision, json.dumps(out["runs"][precision]), flush=True)
    path = HERE / "results" / "precision_accuracy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    cells = "; ".join(f"{k}: {100 * v['test_top1']:.2f}% at {v['train_images_per_sec_median']:.0f} img/s"
                      for k, v in out["runs"].items())
    append_rows([f"| precision_accuracy | {out['date']} | recipe {args.recipe}, {args.epochs:g} epochs, same seed, "
                  f"torch {out['torch']} | {cells} | results/precision_accuracy.json |"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
