"""The time budget's timing probes: what one training step and one end of epoch take, measured on the real
run before it starts. They measure only: the weights, the optimizer state and every random generator come back
as they were (the same seed gives the same weights with or without them), and the budget hears the numbers
from the caller (`Budget.plan`), never as a side effect."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitlab.train.budget import seconds_per_call
from vitlab.train.callbacks import plot_curves
from vitlab.train.checkpoint import SCRATCH_PREFIX, restore_rng, rng_states
from vitlab.train.task import Batch, Task

if TYPE_CHECKING:
    from vitlab.train.loop import Trainer


def time_steps(step: Callable[[Batch], object], task: Task, *, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], batch_size: int,
               sizes: list, device: torch.device, clock: Callable[[], float]) -> dict:
    """{input size: seconds per training step} for each of `sizes` (progressive resizing), then undone."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    rng = rng_states(generators)
    index = torch.arange(batch_size, device=device)
    timed = {}
    for size in sizes:
        batch = task.batch(index, 0, size=size)
        timed[size] = seconds_per_call(lambda b=batch: step(b), warmup=1, repeats=2, device=device, clock=clock)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(weights[k])
    optimizer.load_state_dict(saved_optimizer)
    restore_rng(rng, generators)
    model.zero_grad(set_to_none=True)
    return timed


def time_epoch_end(task: Task, eval_model: torch.nn.Module, *, precision: str, eval_batch_size: int,
                   save: Callable[[Path], None] | None, run_dir: Path, device: torch.device,
                   clock: Callable[[], float]) -> dict[str, float]:
    """"epoch_end_s": an evaluation timed on a slice and scaled to the full one, plus a real `save` into a scratch
    folder of `run_dir` that is then removed (None: not this rank's to write); "final_s": what the final
    evaluation takes beyond it (its extra test-time augmentation passes)."""
    m = min(eval_batch_size, task.eval_size)
    t_eval = seconds_per_call(lambda: task.evaluate(eval_model, precision=precision, limit=m),
                              warmup=1, repeats=1, device=device, clock=clock) * task.eval_size / m
    final_s = t_eval * (task.final_eval_passes() - 1)
    if save is None:
        return {"epoch_end_s": t_eval, "final_s": final_s}
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=run_dir) as scratch:
        t_save = seconds_per_call(lambda: save(Path(scratch)), warmup=1, repeats=1, clock=clock)  # warmup: imports
    return {"epoch_end_s": t_eval + t_save, "final_s": final_s}


# ---- on a Trainer, before its run starts -----------------------------------------------------------------
def probe_step(trainer: Trainer) -> float:
    """Seconds per step at the last input size; `step_cost` gets the others' relative cost."""
    timed = time_steps(trainer.train_step, trainer.task, model=trainer.model, optimizer=trainer.optimizer,
                       generators=trainer.generators, batch_size=trainer.batch_size, sizes=list(trainer.step_cost),
                       device=trainer.device, clock=trainer.clock)
    seconds = list(timed.values())[-1]  # the last size: the data's own
    trainer.step_cost = {size: t / seconds for size, t in timed.items()}
    return seconds


def probe_epoch_end(trainer: Trainer) -> dict[str, float]:
    """`time_epoch_end` of the trainer's evaluation and of a save of everything an epoch end writes."""
    rows = [{"epoch": 1, "step": 1, "train_loss": 1.0, "test_top1": 0.5, "lr": 1.0}]

    def save(scratch: Path) -> None:  # what an epoch end writes: run dir, checkpoint, curves
        trainer.save(scratch)
        plot_curves(trainer, scratch, rows)
    return time_epoch_end(trainer.task, trainer.eval_model, precision=trainer.precision, run_dir=trainer.run_dir,
                          eval_batch_size=trainer.config.eval_batch_size, save=save if trainer.is_main else None,
                          device=trainer.device, clock=trainer.clock)
