"""The ViT (and CNN teacher) classification run, `vitlab train`: `train(config, out=RUN_DIR)` and `resume(RUN_DIR)`
are `vitlab.train.loop.start` / `resume` of `ClassifyRun`, which first trains a "stage" teacher when asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.rundir import RUN_CONFIG
from vitlab.train import loop
from vitlab.train.classify import ClassifyTask, check_model
from vitlab.train.loop import TrainResult
from vitlab.train.recipes import TrainConfig, resolve_recipe
from vitlab.train.streaming import classify_task

TEACHER_DIR = "teacher"  # a "stage" teacher's own run dir, inside the student's


class ClassifyRun:
    """The kind of run `vitlab train` starts: a ClassifyTask (in memory or streamed), after its teacher."""

    kind = ClassifyTask.kind
    config_class = TrainConfig

    @staticmethod
    def open(config: TrainConfig, *, run_dir: Path, device: torch.device, data: str | Path | None,
             download: bool | None, progress: bool, log: Callable[[str], None],
             started_at: float | None) -> ClassifyTask:
        check_model(config)  # a bad --model fails now, not after loading the data
        teacher = teacher_stage(config, run_dir, data=data, device=device, progress=progress, download=download,
                                log=log, started_at=started_at)
        return classify_task(config, device=device, data=data, download=download, teacher=teacher)


def train(config: TrainConfig, *, out: str | Path, data: str | Path | None = None, device: str = "auto",
          progress: bool = True, download: bool | None = None, recipe: str = "", overrides: dict | None = None,
          log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> TrainResult:
    """Train a new run into `out` (which must not already hold a run; use `resume` for that).

    `started_at`: the `time.perf_counter()` reading the time budget counts from (the CLI gives the process
    start); default now.
    """
    return loop.start(ClassifyRun, config, out, data=data, device=device, progress=progress, download=download,
                      record={"recipe": recipe, "overrides": overrides or {}}, log=log, started_at=started_at)


def resume(run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto", progress: bool = True,
           log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> TrainResult:
    """Continue the run in `run_dir` from its last checkpoint, exactly as if it had never stopped."""
    return loop.resume(ClassifyRun, run_dir, data=data, device=device, progress=progress, log=log,
                       started_at=started_at)


def teacher_stage(config: TrainConfig, run_dir: Path, *, started_at: float | None, log: Callable[[str], None],
                  **kw) -> Path | None:
    """With `teacher="stage"`: train (or finish) the CNN teacher in RUN_DIR/teacher first and return its dir.

    Under a time budget the teacher gets `teacher_share` of it, counted from the same start, so the student's
    budget holds both: the teacher's time counts in the student's time to accuracy.
    """
    if config.teacher != "stage":
        return None
    teacher_dir = run_dir / TEACHER_DIR
    if (teacher_dir / RUN_CONFIG).is_file():
        return resume(teacher_dir, started_at=started_at, log=log, **{k: v for k, v in kw.items()
                                                                      if k != "download"}).run_dir
    budget = {"time_budget": config.time_budget * config.teacher_share} if config.time_budget else {}
    tc = resolve_recipe(config.teacher_recipe, seed=config.seed, dataset=config.dataset,
                        train_subset=config.train_subset, test_subset=config.test_subset,
                        val_split=config.val_split, precision=config.precision, **budget)
    log(f"distillation: training the teacher first ({tc.model}, recipe {config.teacher_recipe!r}) in {teacher_dir}")
    return train(tc, out=teacher_dir, started_at=started_at, log=log, recipe=config.teacher_recipe, **kw).run_dir
