"""Fitting a run into a wall-clock budget: time the real work, then choose the number of steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

# Kept free of the budget: 5% plus 10 s covers timing noise on a shared machine, the last checkpoint and
# figure, and process exit. The loop also stops early if it falls behind (see loop.py).
MARGIN_FRACTION = 0.05
MARGIN_S = 10.0


def margin_s(budget_s: float) -> float:
    return MARGIN_FRACTION * budget_s + MARGIN_S


def seconds_per_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3,
                     device: torch.device | None = None) -> float:
    """Median wall time of `fn()` after `warmup` untimed calls (which absorb compilation and allocation)."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_cost(steps: int, *, step_s: float, epoch_s: float, steps_per_epoch: int) -> float:
    """Seconds for `steps` optimizer steps plus one evaluation + checkpoint (`epoch_s`) per started epoch."""
    return steps * step_s + math.ceil(steps / steps_per_epoch) * epoch_s


def plan_steps(available_s: float, *, step_s: float, epoch_s: float, steps_per_epoch: int) -> int:
    """The most optimizer steps whose `run_cost` fits in `available_s` (0 if not even one does)."""
    if available_s <= 0:
        return 0
    # Spreading each evaluation over its epoch's steps gives a lower bound on the cost, hence an upper bound on
    # the steps; a partial last epoch still pays a whole evaluation, so walk down from there (< 1 epoch).
    steps = int(available_s / (step_s + epoch_s / steps_per_epoch)) + 1  # +1: rounding of the division
    while steps > 0 and run_cost(steps, step_s=step_s, epoch_s=epoch_s, steps_per_epoch=steps_per_epoch) \
            > available_s:
        steps -= 1
    return steps
