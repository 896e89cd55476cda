"""What a run keeps on disk besides its metrics: train_config.json (`write_run_files`), the all-or-nothing
checkpoint of the Trainer's state (`write_checkpoint`, also mid-epoch: `mid_epoch_checkpoint`) and its restore,
and the run's plan (steps, schedule, batch; under a time budget from the timing probes), recorded once per run."""

from __future__ import annotations

import dataclasses
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitlab.rundir import RUN_CONFIG
from vitlab.train.checkpoint import (
    check_schedule,
    check_total_steps,
    gather_rng,
    load_checkpoint,
    optimizer_to_files,
    read_epoch_sums,
    restore_optimizer,
    restore_rank_rng,
    rng_states,
    save_checkpoint,
)
from vitlab.train.distributed import all_reduce_sum
from vitlab.train.optim import WarmupCosine
from vitlab.train.parallel import agreed, launch_record
from vitlab.train.probes import probe_epoch_end, probe_step
from vitlab.weights import load_into, write_json

if TYPE_CHECKING:
    from vitlab.train.loop import Trainer


def write_run_files(trainer: Trainer) -> None:
    """train_config.json and the task's own files: everything but the weights, once per start."""
    if not trainer.is_main:
        return
    import numpy

    from vitlab.version import __version__

    trainer.record.update({
        **trainer.task.record(trainer.model),
        "device": str(trainer.device), "torch": torch.__version__, "numpy": numpy.__version__,
        "vitlab": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "threads": torch.get_num_threads(), "launch": launch_record(),
    })
    write_json(trainer.run_dir / RUN_CONFIG, trainer.record)
    trainer.task.write_run_files(trainer.run_dir)


def restore(trainer: Trainer) -> None:
    """Load the last checkpoint: weights, optimizer, EMA, RNG states, counters, metrics so far."""
    tensors, state = load_checkpoint(trainer.run_dir)
    source = f"{trainer.run_dir} checkpoint"
    load_into(trainer.model, tensors["model"], source=source)
    restore_optimizer(trainer.optimizer, tensors.get("optimizer", {}), state["optimizer"], source=source)
    if trainer.ema is not None:
        load_into(trainer.ema.module, tensors["ema"], source=f"{source} EMA")
        trainer.ema.updates = state["ema_updates"]
    restore_rank_rng(tensors["rng"], trainer.generators, seed=trainer.config.seed, step=state["step"], source=source)
    trainer.task.load_state_dict(state.get("task") or {})
    trainer.carried = read_epoch_sums(state, f"{source} state.json")  # a mid-epoch checkpoint's sums (rank 0)
    trainer.step, trainer.epoch = state["step"], state["epoch"]
    trainer.elapsed_before, trainer.finished = state["elapsed_s"], state.get("finished", False)
    trainer.schedule = WarmupCosine(**check_schedule(state["schedule"], f"{source} state.json"))
    trainer.total_steps = check_total_steps(state, trainer.total_steps, timed=trainer.budget is not None,
                                            source=f"{source} state.json")
    trainer.guard.load_state_dict(state.get("guard", {}), source=f"{source} state.json")
    if trainer.budget is not None:
        trainer.budget.carry_over(trainer.elapsed_before)
        trainer.budget.load_state_dict(state.get("budget") or {})
    for log in (trainer.metrics, trainer.step_log):
        log.load()
        log.truncate(trainer.step)


def mid_epoch_checkpoint(trainer: Trainer, loss_sum: torch.Tensor, correct: torch.Tensor | None) -> None:
    """A mid-epoch checkpoint (config.checkpoint_every): what a resume needs, without evaluating, with the
    epoch's training loss and accuracy sums so far (over the ranks)."""
    rng = gather_rng(trainer.generators)
    sums = all_reduce_sum({"loss": loss_sum, "correct": 0 if correct is None else correct})
    sums = {"loss": sums["loss"] / trainer.world_size, "correct": None if correct is None else int(sums["correct"])}
    if trainer.is_main:
        trainer.step_log.write()
        write_checkpoint(trainer, trainer.run_dir, elapsed=round(trainer.elapsed(), 2), rng=rng, epoch_sums=sums)


def write_checkpoint(trainer: Trainer, run_dir: Path, *, elapsed: float, rng: dict | None = None,
                     epoch_sums: dict | None = None) -> None:
    """`rng`: every rank's generator states (`gather_rng`), default this process's; `epoch_sums`: a
    mid-epoch checkpoint's training sums."""
    opt_tensors, opt_meta = optimizer_to_files(trainer.optimizer)
    tensors = {"model": trainer.model.state_dict(), "optimizer": opt_tensors,
               "rng": rng if rng is not None else rng_states(trainer.generators)}
    if trainer.ema is not None:
        tensors["ema"] = trainer.ema.state_dict()
    state = {"epoch": trainer.epoch, "step": trainer.step, "total_steps": trainer.total_steps,
             "schedule": trainer.schedule.state_dict(), "optimizer": opt_meta,
             "ema_updates": trainer.ema.updates if trainer.ema is not None else 0,
             "elapsed_s": elapsed, "finished": trainer.finished,
             "budget": trainer.budget.state_dict() if trainer.budget is not None else None,
             "guard": trainer.guard.state_dict(), "task": trainer.task.state_dict(), "world_size": trainer.world_size,
             "epoch_sums": epoch_sums or {}}
    save_checkpoint(run_dir, tensors=tensors, state=state)


def plan_run(trainer: Trainer) -> None:
    """Number of steps and schedule: from the record when resuming, else the epochs or the time budget."""
    plan = trainer.record.get("plan")
    if plan is None:
        if trainer.is_main:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
        timed = {}
        if trainer.budget is not None:
            timed = {"step_s": probe_step(trainer), **probe_epoch_end(trainer)}
            budgeted = trainer.capped(trainer.budget.plan(step=0, **timed)) if trainer.is_main else None
            total = agreed(budgeted)  # rank 0's
            trainer.set_total_steps(total)
            trainer.schedule = dataclasses.replace(trainer.schedule, warmup_steps=trainer.warmup_steps(total))
            trainer.log(f"time budget {trainer.config.time_budget:g} min: {timed['step_s']:.3f} s/step, "
                        f"{timed['epoch_end_s']:.1f} s per evaluation + save -> {total} steps "
                        f"({total / trainer.steps_per_epoch:.1f} epochs)")
        plan = {"precision": trainer.precision, "total_steps": trainer.total_steps,
                "warmup_steps": trainer.schedule.warmup_steps, "steps_per_epoch": trainer.steps_per_epoch,
                "batch_size": trainer.batch_size, "global_batch_size": trainer.global_batch,
                "world_size": trainer.world_size, **{k: round(v, 4) for k, v in timed.items()}}
        if len(trainer.step_cost) > 1:
            plan["step_cost"] = [[size, round(c, 4)] for size, c in trainer.step_cost.items()]
        if trainer.budget is not None:
            plan["exit_s"] = round(trainer.budget.exit_s, 3)
    elif trainer.budget is not None:  # resuming: go on from the first process's timings (a checkpoint's are newer)
        trainer.budget.load_state_dict({"step_s": plan.get("step_s", 0.0),
                                        "epoch_ends": [plan.get("epoch_end_s", 0.0)],
                                        "final_s": plan.get("final_s", 0.0)})  # older plans: inside exit_s
        trainer.budget.exit_s = plan.get("exit_s", trainer.budget.exit_s)
    if "step_cost" in plan:
        trainer.step_cost = {int(size): float(c) for size, c in plan["step_cost"]}
    trainer.set_total_steps(plan["total_steps"])
    trainer.schedule = dataclasses.replace(trainer.schedule, warmup_steps=plan["warmup_steps"])
    trainer.record["plan"] = plan
    trainer.logged_total = trainer.total_steps


def refit(trainer: Trainer) -> None:
    """Under a time budget, move the end of the schedule to what now fits (vitlab.train.budget.Budget.fit).

    The first plan came from a few timed steps; a shared machine can run slower or faster since. Moving
    the end of the cosine a little at each refit keeps the schedule whole, where the hard stop would cut it.
    """
    total = agreed(trainer.capped(trainer.budget.fit(trainer.step)))  # rank 0's: every rank takes as many steps
    if total != trainer.total_steps:
        trainer.set_total_steps(total)
        if abs(total - trainer.logged_total) > max(0.05 * trainer.logged_total, 10):  # news, not jitter
            trainer.log(f"time budget: the schedule now ends at step {total} instead of {trainer.logged_total}")
            trainer.logged_total = total
