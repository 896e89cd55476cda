"""`vitlab bench`: vitlab's default training path against timm's best mode, on this machine; `--peak`: the
machine's fp32 and bf16 matmul peak, and what a minute here is in reference minutes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from vitlab.errors import VitlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput of vitlab vs timm on this machine",
                       description="Times vitlab's default training path (the one `vitlab train` uses) and, "
                                   "when timm is installed, timm's best mode (fp32 or bf16 autocast) on the "
                                   "same config and weights, back to back in one process.")
    p.add_argument("--model", default="Ti/4", help="variant (default Ti/4)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per candidate (min/median reported)")
    p.add_argument("--no-timm", action="store_true", help="time vitlab only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--peak", action="store_true",
                   help="measure this machine's fp32 and bf16 matmul peak (GFLOP/s, median of --repeats) instead")
    p.add_argument("--peak-size", type=int, default=None, metavar="N",
                   help="--peak: N x N matrices (default 2048 for fp32, 4096 for bf16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.bench import time_side_by_side, timm_twin, train_step_fn
    from vitlab.model import create_model
    from vitlab.speed import default_mode

    if min(args.batch_size, args.steps, args.repeats) <= 0:
        raise VitlabError("--batch-size, --steps and --repeats must be positive")
    if args.peak:
        return run_peak(args)
    model = create_model(args.model, image_size=args.image_size, num_classes=args.num_classes, seed=0)
    mode = default_mode(torch.device("cpu"))
    common = dict(batch_size=args.batch_size, image_size=args.image_size, num_classes=args.num_classes)
    fns = {f"vitlab ({mode['precision']}{', compiled' if mode['compile'] else ''})":
           train_step_fn(model, **mode, **common)}
    with_timm = not args.no_timm and importlib.util.find_spec("timm") is not None
    if with_timm:
        for precision in ("fp32", "bf16"):
            fns[f"timm ({precision})"] = train_step_fn(timm_twin(model), precision=precision, compile=False,
                                                      **common)
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    timings = time_side_by_side(fns, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                                progress=log)
    names = list(timings)
    result = {"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "images_per_sec": {k: {"median": t.median, "best": t.best, "all": t.images_per_sec}
                                 for k, t in timings.items()}}
    if with_timm:
        timm_best = max(names[1:], key=lambda k: timings[k].median)
        result["timm_best"] = timm_best
        result["ratio_vs_timm_best"] = timings[names[0]].median / timings[timm_best].median
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"training throughput, {args.model} at {args.image_size}px, batch {args.batch_size} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} x {args.steps} steps:")
    for k, t in timings.items():
        print(f"  {k:<24} {t.median:8.1f} img/s   (best {t.best:.1f})")
    if with_timm:
        print(f"  vitlab / {result['timm_best']}: {result['ratio_vs_timm_best']:.2f}x")
    elif not args.no_timm:
        print("  (timm is not installed: pip install 'vitlab[dev]' to compare)")
    return 0


def run_peak(args: argparse.Namespace) -> int:
    import torch

    from vitlab.bench import PEAK_SIZES, REFERENCE_PEAK_GFLOPS, machine_peaks

    if args.peak_size is not None and args.peak_size <= 0:
        raise VitlabError("--peak-size must be positive")
    peaks = machine_peaks(repeats=args.repeats, size=args.peak_size)
    sizes = {"fp32": args.peak_size or PEAK_SIZES[torch.float32], "bf16": args.peak_size or PEAK_SIZES[torch.bfloat16]}
    factor = peaks["bf16"] / REFERENCE_PEAK_GFLOPS
    result = {"fp32_gflops": peaks["fp32"], "bf16_gflops": peaks["bf16"], "sizes": sizes, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "reference_bf16_gflops": REFERENCE_PEAK_GFLOPS,
              "reference_minutes_per_minute": factor}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"matmul peak ({torch.get_num_threads()} threads, median of {args.repeats}):")
    for name in ("fp32", "bf16"):
        print(f"  {name}  {peaks[name]:8.1f} GFLOP/s   ({sizes[name]}x{sizes[name]})")
    print(f"one minute here = {factor:.2f} reference minutes (bf16 peak / {REFERENCE_PEAK_GFLOPS:g} GFLOP/s)")
    return 0
