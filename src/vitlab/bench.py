"""This machine's matmul peak (and reference minutes), and side-by-side timing of vitlab and timm on it: same
config, same weights, same process.

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

from vitlab.model import flops_per_image
from vitlab.speed import TrainStep, inference_forward

REFERENCE_PEAK_GFLOPS = 821.0  # bf16 matmul peak of the machine behind benchmarks/RESULTS.md (AMD EPYC, 2 threads)
PEAK_SIZES = {torch.float32: 2048, torch.bfloat16: 4096}  # `vitlab bench --peak`: large enough to reach the peak


def matmul_peak(dtype: torch.dtype, n: int | None = None, *, repeats: int = 5, iters: int = 2, warmup: int = 1,
                clock: Callable[[], float] | None = None) -> float:
    """This machine's matmul peak in GFLOP/s: the median over `repeats` timed loops of `iters` (n, n) @ (n, n)
    products (2 n^3 FLOPs each), after `warmup` untimed ones (oneDNN picks and packs its kernel)."""
    n, clock = n or PEAK_SIZES.get(dtype, 4096), clock or time.perf_counter
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    seconds = []
    for _ in range(repeats):
        t = clock()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        seconds.append(clock() - t)
    return 2 * n**3 * iters / statistics.median(seconds) / 1e9


def machine_peaks(*, repeats: int = 5, size: int | None = None) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}: `matmul_peak` of each at its PEAK_SIZES size (or `size`)."""
    return {name: matmul_peak(dtype, size, repeats=repeats)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def reference_minutes(wall_minutes: float, peak_gflops: float, ref: float = REFERENCE_PEAK_GFLOPS) -> float:
    """Wall minutes on this machine expressed on the reference one: wall x (this bf16 peak / the reference's).

    A guide only: the ops that are not matmuls do not follow the matmul peak, so the step-time ratio of two
    machines sits between 1 and their peak ratio.
    """
    if peak_gflops <= 0:
        raise ValueError(f"peak must be positive, got {peak_gflops}")
    return wall_minutes * peak_gflops / ref


def wall_minutes_for(reference: float, peak_gflops: float, ref: float = REFERENCE_PEAK_GFLOPS) -> float:
    """The wall minutes that make `reference` reference minutes on a machine of `peak_gflops` (the inverse of
    `reference_minutes`): a budget of 3 reference minutes is 6.4 wall minutes at 385 GFLOP/s."""
    return reference * ref / peak_gflops


def run_mfu(cfg, rows: list[dict], *, batch_size: int, peak_gflops: float,
            size_at: Callable[[int], int] | None = None) -> float:
    """MFU of a run's training steps from its metrics rows (`step`, `images_per_sec` per epoch): the model FLOPs
    (`flops_per_image` of `cfg`, any registered family's config) of every step at its input size
    (`size_at(step)`, progressive resizing) over the seconds the steps took."""
    flops, seconds, before = 0.0, 0.0, 0
    for r in rows:
        steps = r["step"] - before
        if steps > 0 and r.get("images_per_sec"):
            seconds += steps * batch_size / r["images_per_sec"]
            flops += sum(flops_per_image(cfg, image_size=size_at(s) if size_at else None, training=True)
                         for s in range(before, r["step"])) * batch_size
        before = r["step"]
    return flops / seconds / (peak_gflops * 1e9) if seconds else 0.0


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


def timm_twin(model: nn.Module) -> nn.Module:
    """timm's model of `model`'s family (VisionTransformer, distilled DeiT, SwinTransformer) with the same config
    and the same weights (vitlab.convert.timm)."""
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

