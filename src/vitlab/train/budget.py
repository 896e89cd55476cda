"""Fitting a run into a wall-clock budget: one `Budget` object plans, refits and stops the run.

The budget counts from a start the caller gives (the CLI gives the process start, so start-up counts) and
ends when the process has exited: every evaluation, checkpoint and figure, and interpreter teardown, are
inside it. All timing goes through an injected `clock`, so tests drive the logic without real time.

    budget = Budget(180, steps_per_epoch=195, start=process_start())
    total = budget.plan(step=0, step_s=timed_step, epoch_end_s=timed_eval_and_save)
    ... after every optimizer step: budget.observe_step(); if budget.should_stop(): stop
    ... after every evaluation + save: budget.observe_epoch_end(seconds)
    ... whenever budget.refit_due(): total = budget.fit(step)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vitlab.errors import VitlabError

# Python's teardown with torch (and matplotlib) loaded, after the last file is written: measured at
# 0.6-0.9 s on the 2-core CPU. Counted, not measured in-process: it happens after the process's last word.
EXIT_S = 1.0
# Kept free at the end for the jitter of the last evaluation + save on a shared machine.
MARGIN_FRACTION = 0.01
MARGIN_S = 0.5
# Refit the step count at least this often (share of the budget), so a machine that speeds up or slows down
# mid-epoch moves the end of the schedule, not the end of the run.
REFIT_FRACTION = 0.01


def margin_s(budget_s: float) -> float:
    return MARGIN_FRACTION * budget_s + MARGIN_S


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that is not known."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the "(comm)" field
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return age if 0 <= age < 86_400 else None  # a container's odd /proc: fall back rather than trust it


def process_start(clock: Callable[[], float] = time.perf_counter) -> float:
    """The `clock` reading at which this process started (now, where that is not known)."""
    return clock() - (process_age_s() or 0.0)


def seconds_per_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3,
                     device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median wall time of `fn()` after `warmup` untimed calls (which absorb compilation and allocation)."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
    return sorted(times)[len(times) // 2]


def run_cost(steps: int, *, step_s: float, epoch_s: float, steps_per_epoch: int, phase: int = 0) -> float:
    """Seconds for `steps` more optimizer steps, `phase` steps into an epoch: the steps plus one evaluation +
    checkpoint (`epoch_s`) per epoch end reached, a partial last epoch included."""
    return steps * step_s + math.ceil((phase + steps) / steps_per_epoch) * epoch_s


def plan_steps(available_s: float, *, step_s: float, epoch_s: float, steps_per_epoch: int, phase: int = 0) -> int:
    """The most optimizer steps whose `run_cost` fits in `available_s` (0 if not even one does)."""
    if available_s <= 0:
        return 0
    # Spreading each evaluation over its epoch's steps gives a lower bound on the cost, hence an upper bound on
    # the steps; a partial last epoch still pays a whole evaluation, so walk down from there (< 1 epoch).
    per_step = max(step_s + epoch_s / steps_per_epoch, 1e-9)
    steps = int(available_s / per_step) + 1  # +1: rounding of the division
    while steps > 0 and run_cost(steps, step_s=step_s, epoch_s=epoch_s, steps_per_epoch=steps_per_epoch,
                                 phase=phase) > available_s:
        steps -= 1
    return steps


class Budget:
    """All time-budget decisions of one run: `plan`, `fit`, `should_stop`, from what the run measures.

    The run ends at `deadline` = start + seconds - margin, its last evaluation, save and process exit
    included. Estimates: seconds per step (the mean over the last refit window, which on a GPU also
    absorbs the asynchronous queue) and seconds per end of epoch (evaluation + save + figure, the larger of
    the last two measured, so a slower disk is believed at once).
    """

    def __init__(self, seconds: float, *, steps_per_epoch: int, clock: Callable[[], float] = time.perf_counter,
                 start: float | None = None, exit_s: float = EXIT_S,
                 work: Callable[[int, int], float] | None = None) -> None:
        self.seconds = seconds
        self.steps_per_epoch = steps_per_epoch
        # work(step, total): steps step..total-1 in units of a reference step (steps of unequal cost, e.g.
        # progressive resizing); None: every step costs one unit. Estimates are then seconds per unit.
        self.work = work
        self.clock = clock
        self.start = clock() if start is None else start
        self.exit_s = exit_s
        self.final_s = 0.0  # what the final evaluation takes beyond a regular one (TTA views), set by plan()
        self.deadline = self.start + seconds - margin_s(seconds)
        self.refit_s = max(REFIT_FRACTION * seconds, 0.5)
        self.step_s = 0.0  # estimates, set by plan() and refreshed by what the run reports
        self.epoch_end_s = 0.0
        self.epoch_ends: list[float] = []
        self.last_step_s = 0.0
        self.window_s, self.window_steps = 0.0, 0  # steps since the last refit
        self.last_tick: float | None = None  # end of the last step or epoch end

    def carry_over(self, seconds: float) -> None:
        """A resumed run: `seconds` of the budget were used by the processes before this one."""
        self.start -= seconds
        self.deadline -= seconds

    def left(self) -> float:
        """Seconds to the deadline."""
        return self.deadline - self.clock()

    def steps_that_fit(self, step: int) -> int:
        """More steps (after `step`) that fit before the deadline, with their epoch ends and the exit."""
        available, phase = self.left() - self.exit_s - self.final_s, step % self.steps_per_epoch
        if self.work is None:
            return plan_steps(available, step_s=self.step_s, epoch_s=self.epoch_end_s,
                              steps_per_epoch=self.steps_per_epoch, phase=phase)

        def fits(more: int) -> bool:
            cost = self.step_s * self.work(step, step + more) + \
                math.ceil((phase + more) / self.steps_per_epoch) * self.epoch_end_s
            return cost <= available

        lo, hi = 0, 1  # the cost grows with the steps: double until it does not fit, then bisect
        while fits(hi):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def plan(self, *, step: int, step_s: float, epoch_end_s: float, final_s: float = 0.0) -> int:
        """The first fit, from a timed step and an estimated end of epoch: the total number of steps.
        `final_s`: seconds the final evaluation takes beyond a regular end of epoch (test-time augmentation)."""
        self.step_s, self.epoch_end_s, self.final_s = step_s, epoch_end_s, final_s
        more = self.steps_that_fit(step)
        if more < 1:
            used = self.clock() - self.start
            raise VitlabError(f"time budget of {self.seconds / 60:g} min is too short: one step takes {step_s:.2f} s, "
                              f"one evaluation + checkpoint {epoch_end_s:.1f} s, exit {self.exit_s + final_s:.1f} s, "
                              f"{margin_s(self.seconds):.1f} s are kept as margin and {used:.0f} s are used already")
        self.last_tick = self.clock()
        return step + more

    def observe_step(self, units: float = 1.0) -> None:
        """Call after each optimizer step (its outputs read back, on a GPU, only now and then); `units`: its
        cost in reference steps (with `work`)."""
        now = self.clock()
        self.last_step_s = (now - (self.last_tick if self.last_tick is not None else now)) / units
        self.window_s += now - (self.last_tick if self.last_tick is not None else now)
        self.window_steps += units
        self.last_tick = now

    def observe_epoch_end(self, seconds: float) -> None:
        """Call after each evaluation + save with what it took."""
        self.epoch_ends.append(seconds)
        self.epoch_end_s = max(self.epoch_ends[-2:])
        self.last_tick = self.clock()

    def refit_due(self) -> bool:
        return self.window_s >= self.refit_s

    def fit(self, step: int) -> int:
        """Refit: the total number of steps that now fit, from the steps and epoch ends measured so far."""
        if self.window_steps:
            self.step_s = self.window_s / self.window_steps
        self.window_s, self.window_steps = 0.0, 0
        return step + self.steps_that_fit(step)

    def should_stop(self, *, after_epoch_end: bool = False, units: float = 1.0) -> bool:
        """Hard stop: True if one more step (of `units` reference steps; after the coming epoch end, if
        `after_epoch_end`) and the final evaluation + save + exit would pass the deadline. The schedule's own
        end comes first when fits are right; this catches a machine that slowed down since the last fit."""
        step_s = max(self.step_s, self.last_step_s) * units
        ahead = step_s + self.epoch_end_s * (2 if after_epoch_end else 1) + self.exit_s + self.final_s
        return self.clock() + ahead > self.deadline

    def state_dict(self) -> dict:
        return {"step_s": self.step_s, "epoch_ends": self.epoch_ends[-2:], "final_s": self.final_s}

    def load_state_dict(self, state: dict) -> None:
        """The estimates of an earlier process of this run (from its plan or checkpoint), to go on from."""
        self.step_s = float(state.get("step_s", self.step_s))
        self.final_s = float(state.get("final_s", self.final_s))
        self.epoch_ends = [float(s) for s in state.get("epoch_ends", [])]
        if self.epoch_ends:
            self.epoch_end_s = max(self.epoch_ends)
        self.last_tick = self.clock()
