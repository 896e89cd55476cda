"""Side-by-side timing of vitlab and timm on this machine: same config, same weights, same process.

Ratios measured in one process are the figures that count on a shared, noisy machine, so every
repeat times vitlab and timm back to back and we report min and median over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.model import VisionTransformer
from vitlab.speed import TrainStep, inference_forward


def matmul_peak(dtype: torch.dtype, *, sizes=(1024, 2048, 4096), repeats: int = 3) -> dict[int, float]:
    """Best FLOP/s of a square matmul per size: the chip's practical peak for MFU."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN picks and packs its kernel
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats))
        out[n] = 2 * n**3 / best
    return out


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Timing:
    images_per_sec: list[float]

    @property
    def min(self) -> float:
        return min(self.images_per_sec)

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_sec)

    @property
    def best(self) -> float:
        return max(self.images_per_sec)


def timm_twin(model: VisionTransformer) -> nn.Module:
    """timm's VisionTransformer (or distilled DeiT) with the same config and the same weights as `model`."""
    from vitlab.convert.timm import timm_class, timm_kwargs, to_timm

    kw = timm_kwargs(model.cfg)
    kw.pop("dynamic_img_size", None)  # timm's fastest path: fixed input size
    twin = timm_class(model.cfg)(**kw)
    twin.load_state_dict(to_timm(model), strict=True)
    return twin


def train_step_fn(model: nn.Module, *, precision: str, compile: bool, batch_size: int, image_size: int,
                  num_classes: int, lr: float = 1e-3) -> Callable[[], torch.Tensor]:
    """One closure that runs a full AdamW training step on a fixed random batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, foreach=True)
    step = TrainStep(model.train(), opt, precision=precision, compile=compile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return lambda: step(x, y)[0]


def infer_fn(model: nn.Module, *, precision: str, compile: bool, batch_size: int, image_size: int
             ) -> Callable[[], torch.Tensor]:
    model = model.eval()
    fwd = inference_forward(torch.compile(model) if compile else model, precision)
    x = torch.randn(batch_size, 3, image_size, image_size)
    return lambda: fwd(x)


def time_side_by_side(fns: dict[str, Callable[[], object]], *, batch_size: int, steps: int, repeats: int,
                      warmup: int = 2, progress: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Interleave the candidates: each repeat times `steps` calls of each, back to back."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if progress:
            progress(f"warmed up {name}")
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                out = fn()
            if isinstance(out, torch.Tensor):
                out.float().sum().item()  # one sync per timed block, not per step
            rates[name].append(batch_size * steps / (time.perf_counter() - t))
        if progress:
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()))
    return {k: Timing(v) for k, v in rates.items()}

