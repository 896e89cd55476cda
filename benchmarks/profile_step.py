"""Where a training step's time goes: torch.profiler op table for vitlab's default path and timm's modes.

    python benchmarks/profile_step.py --model Ti/4 --batch-size 256

Writes benchmarks/results/profile_<model>.md (self CPU time per op, top rows, per candidate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.bench import timm_twin, train_step_fn
from vitlab.model import create_model
from vitlab.speed import default_mode

HERE = Path(__file__).parent


def table(fn, *, steps: int, rows: int) -> str:
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | self CPU ms / step | share | calls / step |", "| --- | ---: | ---: | ---: |"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / steps:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // steps} |")
    lines.append(f"| **total** | **{total / 1e3 / steps:.1f}** | 100% | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Ti/4")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--no-timm", action="store_true")
    args = p.parse_args()
    common = dict(batch_size=args.batch_size, image_size=32, num_classes=10)
    model = create_model(args.model, image_size=32, num_classes=10, seed=0)
    mode = default_mode(torch.device("cpu"))
    cands = {f"vitlab default ({mode['precision']})": train_step_fn(model, **mode, **common)}
    if not args.no_timm:
        for precision in ("fp32", "bf16"):
            cands[f"timm {precision}{' autocast' if precision == 'bf16' else ''}"] = train_step_fn(
                timm_twin(create_model(args.model, image_size=32, num_classes=10, seed=0)),
                precision=precision, compile=False, **common)
    out = [f"# Training-step profile: {args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}\n"]
    for name, fn in cands.items():
        print(f"profiling {name} ...", flush=True)
        out += [f"## {name}\n", table(fn, steps=args.steps, rows=args.rows), ""]
    path = HERE / "results" / f"profile_{args.model.replace('/', '_')}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
