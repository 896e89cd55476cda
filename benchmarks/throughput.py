"""Training and inference throughput, vitlab vs timm, side by side in one process.

For each model (seed, Ti/4, S/4 at 32x32 by default) and each mode (fp32 / bf16 autocast x eager /
compiled) it times a full training step (forward + backward + AdamW) and inference, vitlab and timm
back to back in every repeat, with the same config and weights. Also measures the chip's matmul
peak (fp32, bf16) and reports each mode's MFU. Writes benchmarks/results/throughput.json and a row
per model in benchmarks/RESULTS.md.

    python benchmarks/throughput.py --models seed Ti/4 S/4 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from results_md import append_rows

from vitlab.bench import infer_fn, matmul_peak, time_side_by_side, timm_twin, train_step_fn
from vitlab.model import create_model, estimate_mfu
from vitlab.speed import default_mode

HERE = Path(__file__).parent
MODES = {"fp32-eager": ("fp32", False), "bf16-eager": ("bf16", False),
         "fp32-compiled": ("fp32", True), "bf16-compiled": ("bf16", True)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(variant: str, args, peaks: dict) -> dict:
    base = create_model(variant, image_size=args.image_size, num_classes=10, seed=0)
    common = dict(batch_size=args.batch_size, image_size=args.image_size)
    out = {"variant": variant, "params": base.num_params(), "train": {}, "infer": {}}
    default = default_mode(torch.device("cpu"))
    out["vitlab_default"] = default
    modes = [m for m in args.modes if m in MODES]
    for mode in modes:
        precision, compiled = MODES[mode]
        peak = peaks["bf16" if precision == "bf16" else "fp32"]
        for kind in ("train", "infer"):
            if (kind == "infer" and args.no_infer) or (kind == "train" and args.no_train):
                continue
            fns = {}
            for who in ("vitlab", "timm"):
                model = create_model(variant, image_size=args.image_size, num_classes=10, seed=0)
                model = timm_twin(model) if who == "timm" else model
                fns[who] = (train_step_fn(model, precision=precision, compile=compiled, num_classes=10, **common)
                            if kind == "train" else
                            infer_fn(model, precision=precision, compile=compiled, **common))
            steps = args.steps if kind == "train" else args.steps * 3
            t = time_side_by_side(fns, batch_size=args.batch_size, steps=steps, repeats=args.repeats,
                                  warmup=3 if compiled else 2, progress=lambda m, v=variant, md=mode, kind=kind:
                                  log(f"[{v} {md} {kind}] {m}"))
            out[kind][mode] = {who: {"median": x.median, "min": x.min, "best": x.best, "all": x.images_per_sec,
                                     "mfu_median": estimate_mfu(base.cfg, x.median, peak, training=kind == "train")}
                               for who, x in t.items()}
            out[kind][mode]["ratio_median"] = t["vitlab"].median / t["timm"].median
    for kind in ("train", "infer"):
        if not out[kind]:
            continue
        # The headline: vitlab's default path (what `vitlab train` runs) against timm's best mode above,
        # timed again side by side so the ratio comes from one stretch of machine time.
        timm_mode = max(out[kind], key=lambda m: out[kind][m]["timm"]["median"])
        precision, compiled = MODES[timm_mode]
        twin = timm_twin(create_model(variant, image_size=args.image_size, num_classes=10, seed=0))
        ours = create_model(variant, image_size=args.image_size, num_classes=10, seed=0)
        if kind == "train":
            fns = {"vitlab default": train_step_fn(ours, **default, num_classes=10, **common),
                   "timm best": train_step_fn(twin, precision=precision, compile=compiled, num_classes=10,
                                              **common)}
        else:
            fns = {"vitlab default": infer_fn(ours, **default, **common),
                   "timm best": infer_fn(twin, precision=precision, compile=compiled, **common)}
        steps = args.steps if kind == "train" else args.steps * 3
        t = time_side_by_side(fns, batch_size=args.batch_size, steps=steps, repeats=args.repeats,
                              warmup=3 if compiled else 2,
                              progress=lambda m, k=kind, tm=timm_mode: log(f"[{variant} default vs {tm} {k}] {m}"))
        peak = peaks["fp32" if default["precision"] == "fp32" else "bf16"]
        out[f"{kind}_summary"] = {
            "vitlab_default": f"{default['precision']}{', compiled' if default['compile'] else ''}",
            "timm_best_mode": timm_mode, "vitlab_default_median": t["vitlab default"].median,
            "timm_best_median": t["timm best"].median,
            "ratio_vs_timm_best": t["vitlab default"].median / t["timm best"].median,
            "vitlab_default_mfu_bf16_peak": estimate_mfu(base.cfg, t["vitlab default"].median, peak,
                                                         training=kind == "train"),
            "all": {k: v.images_per_sec for k, v in t.items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tutorial", "Ti/4", "S/4"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "throughput.json")
    p.add_argument("--no-results-md", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()

    log("measuring matmul peak ...")
    peaks_by_size = {str(dt).split(".")[-1]: {n: matmul_peak(dt, n, repeats=3) * 1e9 for n in (1024, 2048, 4096)}
                     for dt in (torch.float32, torch.bfloat16)}  # FLOP/s per size
    peaks = {"fp32": max(peaks_by_size["float32"].values()), "bf16": max(peaks_by_size["bfloat16"].values())}
    log(f"peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "batch_size": args.batch_size,
        "matmul_peak_flops": peaks_by_size, "peak_flops": peaks,
        "models": [bench_model(v, args, peaks) for v in args.models],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    rows = []
    for m in result["models"]:
        for kind in ("train", "infer"):
            if kind not in m or not m[kind]:
                continue
            cells = "; ".join(f"{mode}: {r['vitlab']['median']:.0f} vs {r['timm']['median']:.0f} "
                              f"({r['ratio_median']:.2f}x, MFU {100 * r['vitlab']['mfu_median']:.0f}%)"
                              for mode, r in m[kind].items())
            s = m[f"{kind}_summary"]
            rows.append(f"| throughput | {result['date']} | {m['variant']} {kind}, batch {args.batch_size}, "
                        f"{result['threads']} threads, torch {result['torch']} | vitlab default "
                        f"({s['vitlab_default']}) {s['vitlab_default_median']:.0f} img/s vs timm best "
                        f"({s['timm_best_mode']}) {s['timm_best_median']:.0f} img/s = "
                        f"**{s['ratio_vs_timm_best']:.2f}x**, MFU {100 * s['vitlab_default_mfu_bf16_peak']:.0f}% "
                        f"of the measured peak | same-mode img/s vitlab vs timm, median of {args.repeats}: "
                        f"{cells} |")
    print("\n".join(rows))
    if not args.no_results_md:
        append_rows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
