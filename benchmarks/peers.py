"""The peers of `cifar10_time_to_accuracy.py sprint --peers`: the plain PyTorch loop users write, for
timm's VisionTransformer and a 32 px ResNet-18, stopped by the clock.

    python benchmarks/peers.py timm-vit --minutes 3 --width 128 --depth 6 --heads 4 --mlp-dim 256
    python benchmarks/peers.py resnet18 --minutes 3

The loop: AdamW (weight decay on every parameter, as `AdamW(model.parameters())` does), a linear warmup over
the first 10% of the steps then a cosine to zero at the last planned step, random crop (pad 4) + horizontal
flip, cross-entropy with label smoothing 0.1, batch 256. Precision: a short probe times a few steps in fp32
and in bf16 autocast, on a copy of the model, and the run trains in the faster one. The number of steps is
planned from the probe's step time so that the cosine ends at the clock, leaving the time of one evaluation
(forward ~ 1/3 of a training step), and re-planned at every epoch's end from that epoch's step time (a machine
that speeds up after the probe would otherwise leave minutes unused); the loop also stops when the clock
says so. Time counts from the process start, data loading, probe and the final evaluation on the full test
set included, as `vitlab train` counts. Data: the same uint8 CIFAR-10 tensors and the same batched crop +
flip vitlab uses (equal to torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip image by image), so
the loader is not what differs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data import load_cifar10
from vitlab.data.augment import normalize, random_crop_flip
from vitlab.data.dataset import ImageDataset
from vitlab.train.budget import process_start

PEERS = ("timm-vit", "resnet18")
PRECISIONS = ("fp32", "bf16")


def timm_vit(width: int, depth: int, heads: int, mlp_dim: int, num_classes: int = 10) -> nn.Module:
    """timm's VisionTransformer on 32 px images: patchify with 4 x 4 patches, a class token, as timm builds it."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=width, depth=depth,
                             num_heads=heads, mlp_ratio=mlp_dim / width, qkv_bias=True, class_token=True,
                             global_pool="token")


def resnet18_32px(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32 px, as CIFAR code does: a 3x3 stride-1 stem conv, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step(model, opt, x, y, precision: str, label_smoothing: float) -> torch.Tensor:
    with autocast(precision):
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def batch(data: ImageDataset, index: torch.Tensor, g: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Images (normalized float, cropped + flipped when `g` is given) and labels at `index`."""
    images = data.images[index]
    if g is not None:
        images = random_crop_flip(images, padding=4, generator=g)
    return normalize(images), data.labels[index]


def probe_precision(model, make_opt, x, y, *, steps: int, label_smoothing: float,
                    clock: Callable[[], float]) -> dict[str, float]:
    """Seconds per training step in each precision: one untimed step, then the median of `steps` timed ones,
    each on a fresh copy of the model (the run's weights stay untouched)."""
    seconds = {}
    for precision in PRECISIONS:
        m = copy.deepcopy(model)
        opt = make_opt(m)
        train_step(m, opt, x, y, precision, label_smoothing)
        times = []
        for _ in range(steps):
            t = clock()
            train_step(m, opt, x, y, precision, label_smoothing)
            times.append(clock() - t)
        seconds[precision] = sorted(times)[len(times) // 2]
    return seconds


@torch.no_grad()
def evaluate(model, data: ImageDataset, precision: str, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = batch(data, torch.arange(i, min(i + batch_size, len(data))))
        with autocast(precision):
            correct += (model(x).argmax(-1) == y).sum().item()
    return correct / len(data)


def train_peer(name: str, build: Callable[[], nn.Module], *, minutes: float, data: str | None = None,
               train: ImageDataset | None = None, test: ImageDataset | None = None, batch_size: int = 256,
               lr: float = 1e-3, weight_decay: float = 0.05, label_smoothing: float = 0.1, warmup: float = 0.1,
               probe_steps: int = 3, max_steps: int = 0, seed: int = 0, started_at: float | None = None,
               clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] = print) -> dict:
    """Train `build()` on CIFAR-10 for `minutes` of wall clock from `started_at` (default now); the result entry."""
    t0 = clock() if started_at is None else started_at
    budget_s = minutes * 60
    torch.manual_seed(seed)
    train = train if train is not None else load_cifar10(data, "train")
    test = test if test is not None else load_cifar10(data, "test")
    model = build()

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)

    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train))
    x, y = batch(train, torch.arange(batch_size), g)
    probe = probe_precision(model, make_opt, x, y, steps=probe_steps, label_smoothing=label_smoothing, clock=clock)
    precision = min(probe, key=probe.get)
    step_s = probe[precision]
    eval_s = step_s * len(test) / batch_size / 3  # a forward pass is about a third of a training step
    steps_per_epoch = len(train) // batch_size

    def steps_that_fit(now: float, step: int, step_s: float) -> int:
        fit = step + max(0, int((budget_s - (now - t0) - eval_s) / step_s))
        return max(1, min(fit, max_steps) if max_steps else fit)

    planned = total = steps_that_fit(clock(), 0, step_s)
    warm = max(1, round(warmup * total))
    opt = make_opt(model)

    def lr_factor(s: int) -> float:  # reads `total` when called: a re-plan moves the end of the cosine
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, probe "
        f"{', '.join(f'{k} {v:.3f} s/step' for k, v in probe.items())} -> {precision}; {total} steps planned")

    model.train()
    step, t_train = 0, clock()
    now = t_epoch = t_train
    while step < total and now - t0 + eval_s < budget_s:
        order, first = torch.randperm(len(train), generator=g), step
        for i in range(steps_per_epoch):
            if step >= total or clock() - t0 + eval_s >= budget_s:
                break
            x, y = batch(train, order[i * batch_size:(i + 1) * batch_size], g)
            loss = train_step(model, opt, x, y, precision, label_smoothing)
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"{name}: step {step}/{total}  loss {loss.item():.3f}  {(clock() - t0) / 60:.1f} min")
        now = clock()
        if step > first:  # re-plan from the epoch's step time, as vitlab's --time-budget does: the cosine ends at
            total = steps_that_fit(now, step, (now - t_epoch) / (step - first))  # the clock if the machine drifts
        t_epoch = now
    train_s = clock() - t_train
    top1 = evaluate(model, test, precision)
    return {"name": name, "top1": top1, "steps": step, "planned_steps": planned, "final_planned_steps": total,
            "epochs": step / steps_per_epoch,
            "img_per_s": round(step * batch_size / max(train_s, 1e-9), 1), "minutes": round((clock() - t0) / 60, 3),
            "budget_minutes": minutes, "precision": precision, "probe_step_s": probe, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=PEERS)
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock minutes from the process start")
    ap.add_argument("--width", type=int, default=128, help="timm-vit: embedding width")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-dim", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--probe-steps", type=int, default=3, help="timed steps per precision in the probe")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the clock decides)")
    ap.add_argument("--data", help="CIFAR-10 directory (default: $VITLAB_DATA, else the cache)")
    ap.add_argument("--out", type=Path, help="write the result entry here as JSON")
    args = ap.parse_args(argv)
    started_at = process_start()
    build = (lambda: timm_vit(args.width, args.depth, args.heads, args.mlp_dim)) if args.peer == "timm-vit" \
        else resnet18_32px
    name = f"timm ViT {args.width}w {args.depth}d" if args.peer == "timm-vit" else "ResNet-18 (32 px)"
    entry = train_peer(name, build, minutes=args.minutes, data=args.data, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, probe_steps=args.probe_steps, max_steps=args.max_steps,
                       started_at=started_at,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(entry, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
