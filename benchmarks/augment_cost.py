"""Time the full training augmentation of one batch of real CIFAR-10 images; prints JSON.

    python benchmarks/augment_cost.py [--data DIR] [--batch 256] [--repeats 20] [--threads N]

Compare `median_ms` with the time of one training step: the issue's budget is augmentation <= 10% of it.
Each recipe is timed separately so a slow stage shows up by name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import torch

from vitlab.data import AugmentConfig, BatchAugment, load_cifar10

RECIPES = {
    "full_trivial": AugmentConfig(policy="trivial"),  # crop, flip, TrivialAugment, mixup/cutmix, smoothing
    "full_randaug": AugmentConfig(policy="randaug"),
    "crop_flip_only": AugmentConfig(policy="none", mixup_alpha=0, cutmix_alpha=0, label_smoothing=0),
    "eval_normalize": None,
}


def time_ms(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 directory or archive (default: $VITLAB_DATA)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--aug-threads", type=int, default=1, help="BatchAugment cpu_threads; 0 = same as --threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_cifar10(args.data, "test")  # None: $VITLAB_DATA
    images = data.images[: args.batch].to(args.device)  # (B, 3, 32, 32) uint8
    labels = data.labels[: args.batch].to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    results = {}
    for name, cfg in RECIPES.items():
        aug = BatchAugment(cfg or AugmentConfig(), num_classes=data.num_classes, cpu_threads=args.aug_threads or None)
        step = partial(aug.eval_transform, images) if cfg is None else partial(aug, images, labels, gen)
        times = time_ms(step, args.repeats, sync)
        results[name] = {"min_ms": round(min(times), 2), "median_ms": round(statistics.median(times), 2)}
    print(json.dumps({
        "batch": args.batch, "image_size": 32, "device": args.device, "threads": torch.get_num_threads(),
        "aug_threads": args.aug_threads or torch.get_num_threads(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
