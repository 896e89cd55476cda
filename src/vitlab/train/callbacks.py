"""What the loop calls at its named points, so that reporting stays out of it: `on_step` after each optimizer step,
`on_eval` after each evaluation + save (with the new metrics row), `on_end` when the run stops (done or not).

A callback reads the Trainer and never edits it. `EmaUpdate` moves the EMA of the weights, `Report` writes
curves.png and the epoch's log line;
`vitlab.train.tensorboard.TensorBoardLog` writes the event files.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vitlab.train.metrics import CURVES_PNG, figures

if TYPE_CHECKING:
    from pathlib import Path

    from vitlab.train.ema import ModelEma
    from vitlab.train.loop import Trainer


class Callback:
    def on_step(self, trainer: Trainer) -> None:
        """After each optimizer step (`trainer.step` counts it; steps.jsonl has its point when one is due)."""

    def on_eval(self, trainer: Trainer, row: dict, *, seconds: float) -> None:
        """After each evaluation + save (`row`: the metrics row just written; `seconds`: what both took)."""

    def on_end(self, trainer: Trainer) -> None:
        """When the run stops, finished or interrupted."""


class EmaUpdate(Callback):
    """The EMA of the weights follows each optimizer step (it is evaluated and saved in their place)."""

    def __init__(self, ema: ModelEma) -> None:
        self.ema = ema

    def on_step(self, trainer: Trainer) -> None:
        self.ema.update(trainer.model)


def plot_curves(trainer: Trainer, run_dir: Path, rows: list[dict]) -> Path | None:
    """curves.png of `rows` into `run_dir`, or None without matplotlib (also what the time budget's probe saves)."""
    plots = figures()
    if plots is None or not rows:
        return None
    fig = plots.plot_curves(rows, title=f"{trainer.run_dir.name}: {trainer.task.describe(trainer.model)}")
    return plots.save_figure(fig, run_dir / CURVES_PNG)


class Report(Callback):
    """Rank 0, after each evaluation: curves.png and the log line (metrics, speed, time used and left)."""

    def __init__(self) -> None:
        self.noted_no_plot = False

    def on_eval(self, trainer: Trainer, row: dict, *, seconds: float) -> None:
        if not trainer.is_main:
            return
        if plot_curves(trainer, trainer.run_dir, trainer.metrics.rows) is None and not self.noted_no_plot:
            trainer.log("matplotlib is not installed: no curves.png (pip install 'vitlab[plot]')")
            self.noted_no_plot = True
        shown = [f"{k} {row[k]:.4f}" if "loss" in k else f"{k} {row[k]:.2%}"
                 for k in ("train_loss", "train_acc", "test_loss", "test_top1", "val_top1") if row.get(k) is not None]
        left = "" if trainer.finished else f", ~{minutes_left(trainer, seconds):.1f} min left"
        trainer.log(f"epoch {trainer.epoch}  step {trainer.step}  {'  '.join(shown)}  lr {trainer.lr:.2e}  "
                    f"{row['images_per_sec']:.0f} img/s  ({row['elapsed_s'] / 60:.1f} min{left}; "
                    f"eval+save {seconds:.1f} s)")


def minutes_left(trainer: Trainer, eval_s: float) -> float:
    """From the last epoch's speed (to the deadline under a time budget)."""
    if trainer.budget is not None:
        return max(trainer.budget.left(), 0.0) / 60
    steps = trainer.total_steps - trainer.step
    train_s = steps * trainer.global_batch / max(trainer.epoch_stats["images_per_sec"], 1e-9)
    return (train_s + math.ceil(steps / trainer.steps_per_epoch) * eval_s) / 60
