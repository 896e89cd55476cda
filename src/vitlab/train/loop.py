"""The shared training loop: `Trainer` runs any `Task`; `train(config, out=RUN_DIR)` and `resume(RUN_DIR)`
are the ViT classification run (`vitlab train`), `vitlab.clip.train` the CLIP one (`vitlab train-clip`).

One step: this epoch's seeded permutation (the `data` generator) picks the batch, the task builds it on the
device (`Task.batch(index, step)`), `vitlab.speed.TrainStep` runs forward + `Task.loss` + backward + clip +
AdamW step, then the EMA update, with the learning rate from the per-step warmup + cosine schedule. At each
epoch end: evaluate (`Task.evaluate`), log metrics, write the run dir (`Task.save`) and an all-or-nothing
checkpoint. Under a time budget, `Budget` (vitlab.train.budget) plans, refits and stops the run.

Determinism: every random draw comes from the global torch RNG (dropout, drop-path), the `data` generator
and the task's generators, all seeded from `config.seed` and saved in each checkpoint, so on one machine the
same seed gives the same weights and a resumed run the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.errors import VitlabError
from vitlab.rundir import RUN_CONFIG
from vitlab.speed import TrainStep
from vitlab.train.budget import Budget, seconds_per_call
from vitlab.train.checkpoint import (
    SCRATCH_PREFIX,
    check_record,
    check_schedule,
    check_total_steps,
    has_checkpoint,
    load_checkpoint,
    optimizer_to_files,
    restore_optimizer,
    restore_rng,
    rng_states,
    save_checkpoint,
)
from vitlab.train.classify import ClassifyTask, check_model
from vitlab.train.distributed import all_reduce_sum, get_rank, get_world_size, shard_permutation
from vitlab.train.ema import ModelEma
from vitlab.train.guard import NonFiniteGuard, claim_run_dir, describe_stop
from vitlab.train.metrics import CURVES_PNG, STEPS, MetricsLog, figures
from vitlab.train.optim import WarmupCosine, create_optimizer
from vitlab.train.parallel import (
    agreed,
    batch_sizes,
    data_parallel,
    describe_batch,
    gather_rng,
    joins_torchrun,
    launch_record,
    read_epoch_sums,
    restarted_run,
    restore_rank_rng,
    seed_rank,
)
from vitlab.train.recipes import RunConfig, TrainConfig, resolve_recipe
from vitlab.train.runtime import resolve_device
from vitlab.train.streaming import classify_task
from vitlab.train.task import Batch, Task
from vitlab.train.tensorboard import open_tensorboard
from vitlab.train.tta import TTA_VIEWS
from vitlab.weights import load_into, read_json, write_json


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]  # one row per epoch, as in metrics.jsonl
    steps: list[dict] = field(default_factory=list)  # the loss every log_every steps, as in steps.jsonl

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def test_top1(self) -> float:
        return self.final.get("test_top1", float("nan"))


# ---- ViT classification: `vitlab train` ------------------------------------------------------------------
@joins_torchrun  # under torchrun: this rank's device, in the job's process group
def train(config: TrainConfig, *, out: str | Path, data: str | Path | None = None, device: str = "auto",
          progress: bool = True, download: bool | None = None, recipe: str = "", overrides: dict | None = None,
          log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> TrainResult:
    """Train a new run into `out` (which must not already hold a run; use `resume` for that).

    `started_at`: the `time.perf_counter()` reading the time budget counts from (the CLI gives the process
    start); default now.
    """
    if restarted_run(out):  # torchrun restarted this job (--max-restarts): go on from its checkpoint
        return resume(out, data=data, device=device, progress=progress, log=log, started_at=started_at)
    run_dir = check_new_run_dir(out)
    check_model(config)  # a bad --model fails now, not after loading the data
    started_at = time.perf_counter() if started_at is None else started_at
    teacher = teacher_stage(config, run_dir, data=data, device=device, progress=progress, download=download, log=log,
                            started_at=started_at)
    task = classify_task(config, device=resolve_device(device), data=data, download=download, teacher=teacher)
    record = {"task": task.kind, "recipe": recipe, "overrides": overrides or {}, "config": task.config.to_dict()}
    return Trainer(task, run_dir, record=record, progress=progress, log=log, started_at=started_at).run()


@joins_torchrun
def resume(run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto", progress: bool = True,
           log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> TrainResult:
    """Continue the run in `run_dir` from its last checkpoint, exactly as if it had never stopped."""
    run_dir, record, config = read_run(run_dir, TrainConfig, ClassifyTask)
    data = data if data is not None else record.get("data", {}).get("root")
    teacher = teacher_stage(config, run_dir, data=data, device=device, progress=progress, log=log,
                            started_at=started_at)
    task = classify_task(config, device=resolve_device(device), data=data, teacher=teacher)
    return Trainer(task, run_dir, record=record, progress=progress, log=log, resuming=True,
                   started_at=started_at).run()


TEACHER_DIR = "teacher"  # a "stage" teacher's own run dir, inside the student's


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


def check_new_run_dir(out: str | Path) -> Path:
    run_dir = Path(out)
    if (run_dir / RUN_CONFIG).exists() or has_checkpoint(run_dir):
        raise VitlabError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    return run_dir


def read_run(run_dir: str | Path, config_class: type[RunConfig],
             task_class: type[Task]) -> tuple[Path, dict, RunConfig]:
    """(run dir, its train_config.json, the config in it) of a run of `task_class`'s kind, for resuming."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"cannot resume: {run_dir} is not a directory")
    record = check_record(read_json(run_dir / RUN_CONFIG), run_dir / RUN_CONFIG)
    kind = record.get("task", ClassifyTask.kind)  # runs from before tasks were recorded are classification
    if kind != task_class.kind:
        raise VitlabError(f"{run_dir} is a {kind!r} run, not a {task_class.kind!r} one; resume it with the command "
                          f"that started it")
    try:
        config = config_class.from_dict(record["config"])
    except (KeyError, TypeError) as e:
        raise VitlabError(f"{run_dir / RUN_CONFIG} does not describe a training run ({e})") from None
    return run_dir, record, config


# ---- the shared loop ------------------------------------------------------------------------------------
class Trainer:
    """State of one run of a `Task`; `run()` trains it to the end. Read top to bottom: setup, plan, loop,
    epoch end.

    Places later features hook into: `after_step` (per-step checks such as a non-finite-loss guard, per-step
    scalars), `after_eval` (per-evaluation callbacks: figures, TensorBoard), `epoch_order` (a distributed
    rank's shard of the permutation), `is_main` (only rank 0 writes), `Task.build_model` (initial weights).
    """

    def __init__(self, task: Task, run_dir: str | Path, *, record: dict, progress: bool = True,
                 log: Callable[[str], None] = tqdm.write, resuming: bool = False,
                 clock: Callable[[], float] = time.perf_counter, started_at: float | None = None) -> None:
        c = self.config = task.config
        self.task, self.run_dir, self.record, self.log = task, Path(run_dir), record, log
        self.progress, self.resuming, self.clock = progress, resuming, clock
        self.t0 = clock() if started_at is None else started_at  # elapsed time and the budget count from here
        self.device = task.device
        self.rank, self.world_size = get_rank(), get_world_size()  # torchrun's (only rank 0 writes)
        if self.rank:  # only rank 0 logs and shows progress
            self.log, self.progress = (lambda s: None), False
        torch.manual_seed(c.seed)  # global RNG (CPU and CUDA): dropout and drop-path

        self.model = task.build_model().to(self.device)
        seed_rank(task.generators, seed=c.seed)  # ranks > 0: their own dropout and augmentation streams
        self.forward = torch.compile(self.model) if c.compile else self.model  # for evaluation
        self.precision = record.get("plan", {}).get("precision") or task.resolve_precision(c.precision)
        self.optimizer = create_optimizer(self.model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas,
                                          optimizer=c.optimizer, layer_decay=getattr(c, "layer_decay", 0.0) or None)
        self.train_step_fn = TrainStep(task.train_module(self.model), self.optimizer, precision=self.precision,
                                       compile=c.compile, clip_grad=c.grad_clip, loss_fn=task.loss,
                                       track_grad_norm=True, skip_nonfinite=c.on_nonfinite == "skip")
        self.ema = ModelEma(self.model, decay=c.ema) if c.ema else None
        data_parallel(self.train_step_fn)  # several processes: DDP averages the gradients over them
        self.guard = NonFiniteGuard.for_trainer(self)  # NaN/Inf loss or gradient norm: stop, or skip the step

        # per process and over all processes: --batch-size per process; a resumed run keeps its global batch
        self.batch_size, self.global_batch = batch_sizes(c.batch_size, task.train_size, record.get("plan"))
        self.steps_per_epoch = max(1, task.train_size // self.global_batch)  # drop the last partial batch, as timm
        self.total_steps = self.capped(max(1, round(c.epochs * self.steps_per_epoch)))  # a budget refits it
        self.schedule = WarmupCosine(c.lr, self.total_steps, self.warmup_steps(self.total_steps), c.min_lr,
                                     decay=c.decay)
        # relative cost of a step at each input size (progressive resizing), measured by time_step
        self.step_cost: dict = {size: 1.0 for size in task.input_sizes()}
        uneven = len(self.step_cost) > 1
        self.budget = Budget(c.time_budget * 60, steps_per_epoch=self.steps_per_epoch, clock=clock, start=self.t0,
                             work=self.work if uneven else None) if c.time_budget else None
        task.set_schedule(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        self.metrics = MetricsLog(self.run_dir)
        self.step_log = MetricsLog(self.run_dir, STEPS, columns=None)
        self.step, self.epoch, self.elapsed_before, self.finished = 0, 0, 0.0, False
        self.lr = c.lr
        self.epoch_stats: dict = {}  # train_loss, train_acc, images_per_sec of the last epoch
        self.carried: dict = {}  # training sums of the epoch a mid-epoch checkpoint was taken in
        self.logged_total = self.total_steps  # the schedule length last reported in the log
        self.noted_no_plot = False
        self.tensorboard = None  # a vitlab.train.tensorboard.TensorBoardLog once run() starts, with --tensorboard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return dict(self.task.generators)  # the epoch order is a function of (seed, epoch): `epoch_order`

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.forward

    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.t0

    def capped(self, total: int) -> int:
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def warmup_steps(self, total: int) -> int:
        warmup = min(round(self.config.warmup_epochs * self.steps_per_epoch), total)
        if self.config.time_budget:  # a budget may cut the run far below the recipe's epochs: keep warmup <= 1/5
            warmup = min(warmup, total // 5)
        return warmup

    # ---- setup -----------------------------------------------------------------------------------------
    def plan(self) -> None:
        """Number of steps and schedule: from the record when resuming, else the epochs or the time budget."""
        plan = self.record.get("plan")
        if plan is None:
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            timed = {}
            if self.budget is not None:
                timed = {"step_s": self.time_step(), "epoch_end_s": self.time_epoch_end()}
                total = agreed(self.capped(self.budget.plan(step=0, **timed)) if self.is_main else None)  # rank 0's
                self.set_total_steps(total)
                self.schedule = dataclasses.replace(self.schedule, warmup_steps=self.warmup_steps(total))
                self.log(f"time budget {self.config.time_budget:g} min: {timed['step_s']:.3f} s/step, "
                         f"{timed['epoch_end_s']:.1f} s per evaluation + save -> {total} steps "
                         f"({total / self.steps_per_epoch:.1f} epochs)")
            plan = {"precision": self.precision, "total_steps": self.total_steps,
                    "warmup_steps": self.schedule.warmup_steps, "steps_per_epoch": self.steps_per_epoch,
                    "batch_size": self.batch_size, "global_batch_size": self.global_batch,
                    "world_size": self.world_size, **{k: round(v, 4) for k, v in timed.items()}}
            if len(self.step_cost) > 1:
                plan["step_cost"] = [[size, round(c, 4)] for size, c in self.step_cost.items()]
            if self.budget is not None:
                plan["exit_s"] = round(self.budget.exit_s, 3)
        elif self.budget is not None:  # resuming: go on from the first process's timings (a checkpoint's are newer)
            self.budget.load_state_dict({"step_s": plan.get("step_s", 0.0),
                                         "epoch_ends": [plan.get("epoch_end_s", 0.0)]})
            self.budget.exit_s = plan.get("exit_s", self.budget.exit_s)
        if "step_cost" in plan:
            self.step_cost = {int(size): float(c) for size, c in plan["step_cost"]}
        self.set_total_steps(plan["total_steps"])
        self.schedule = dataclasses.replace(self.schedule, warmup_steps=plan["warmup_steps"])
        self.record["plan"] = plan
        self.logged_total = self.total_steps

    def set_total_steps(self, total: int) -> None:
        """Move the end of the run (and of the cosine, and of the task's schedules) to step `total`."""
        self.total_steps = total
        self.schedule = dataclasses.replace(self.schedule, total_steps=max(total, 1))
        self.task.set_schedule(total_steps=max(total, 1), steps_per_epoch=self.steps_per_epoch)

    def work(self, step: int, total: int) -> float:
        """Steps `step`..`total`-1 in units of a full-size step (for the time budget)."""
        return self.task.work(step, total, self.step_cost)

    def step_units(self, step: int) -> float:
        return self.step_cost.get(self.task.step_size(step), 1.0)

    def time_step(self) -> float:
        """Seconds per training step (at the last input size; `step_cost` gets the others' relative cost),
        measured on the real model, then undone.

        The weights, the optimizer state and every random generator come back as they were, so measuring
        changes nothing about the run (the same seed gives the same weights with or without it).
        """
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        rng = rng_states(self.generators)
        index = torch.arange(self.batch_size, device=self.device)
        timed = {}
        for size in self.step_cost:
            batch = self.task.batch(index, 0, size=size)
            timed[size] = seconds_per_call(lambda b=batch: self.train_step(b), warmup=1, repeats=2,
                                           device=self.device, clock=self.clock)
        seconds = timed[size]  # the last size: the data's own
        self.step_cost = {s: t / seconds for s, t in timed.items()}
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(weights[k])
        self.optimizer.load_state_dict(optimizer)
        restore_rng(rng, self.generators)
        self.model.zero_grad(set_to_none=True)
        return seconds

    def time_epoch_end(self) -> float:
        """Seconds one end of epoch takes: an evaluation timed on a slice and scaled to the full one, plus a
        real save (run dir, checkpoint, curves) into a scratch folder that is then removed."""
        m = min(self.config.eval_batch_size, self.task.eval_size)
        t_eval = seconds_per_call(lambda: self.task.evaluate(self.eval_model, precision=self.precision, limit=m),
                                  warmup=1, repeats=1, device=self.device, clock=self.clock)
        if not self.is_main:  # rank 0 writes, and its timings plan the run
            return t_eval * self.task.eval_size / m
        rows = [{"epoch": 1, "step": 1, "train_loss": 1.0, "test_top1": 0.5, "lr": 1.0}]
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self.run_dir) as scratch:
            def save() -> None:
                self.save(Path(scratch))
                self.plot_curves(Path(scratch), rows)
            t_save = seconds_per_call(save, warmup=1, repeats=1, clock=self.clock)  # warmup: matplotlib's import
        if self.budget is not None and getattr(self.config, "tta", "none") != "none":  # the final evaluation's views
            self.budget.exit_s += t_eval * self.task.eval_size / m * (TTA_VIEWS[self.config.tta] - 1)
        return t_eval * self.task.eval_size / m + t_save

    def restore(self) -> None:
        """Load the last checkpoint: weights, optimizer, EMA, RNG states, counters, metrics so far."""
        tensors, state = load_checkpoint(self.run_dir)
        source = f"{self.run_dir} checkpoint"
        load_into(self.model, tensors["model"], source=source)
        restore_optimizer(self.optimizer, tensors.get("optimizer", {}), state["optimizer"], source=source)
        if self.ema is not None:
            load_into(self.ema.module, tensors["ema"], source=f"{source} EMA")
            self.ema.updates = state["ema_updates"]
        restore_rank_rng(tensors["rng"], self.generators, seed=self.config.seed, step=state["step"], source=source)
        self.task.load_state_dict(state.get("task") or {})
        self.carried = read_epoch_sums(state, f"{source} state.json")  # a mid-epoch checkpoint's sums (rank 0)
        self.step, self.epoch = state["step"], state["epoch"]
        self.elapsed_before, self.finished = state["elapsed_s"], state.get("finished", False)
        self.schedule = WarmupCosine(**check_schedule(state["schedule"], f"{source} state.json"))
        self.total_steps = check_total_steps(state, self.total_steps, timed=self.budget is not None,
                                             source=f"{source} state.json")
        self.guard.load_state_dict(state.get("guard", {}), source=f"{source} state.json")
        if self.budget is not None:
            self.budget.carry_over(self.elapsed_before)
            self.budget.load_state_dict(state.get("budget") or {})
        for log in (self.metrics, self.step_log):
            log.load()
            log.truncate(self.step)

    def write_run_files(self) -> None:
        """train_config.json and the task's own files: everything but the weights, once per start."""
        if not self.is_main:
            return
        import numpy

        from vitlab import __version__

        self.record.update({
            **self.task.record(self.model),
            "device": str(self.device), "torch": torch.__version__, "numpy": numpy.__version__,
            "vitlab": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "threads": torch.get_num_threads(), "launch": launch_record(),
        })
        write_json(self.run_dir / RUN_CONFIG, self.record)
        self.task.write_run_files(self.run_dir)

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the end, the only writer of the run dir (`vitlab.train.guard.claim_run_dir`)."""
        if not self.is_main:
            return self.run_locked()
        how = "--resume" if self.resuming else "--out"
        with claim_run_dir(self.run_dir, command=f"{self.task.command} {how} {self.run_dir}", log=self.log):
            if not self.resuming:
                check_new_run_dir(self.run_dir)  # a run may have started here since train() looked
            return self.run_locked()

    def run_locked(self) -> TrainResult:
        self.plan()
        if self.resuming and has_checkpoint(self.run_dir):
            self.restore()
            if self.finished:
                self.log(f"{self.run_dir} is already complete ({self.epoch} epochs, {self.step} steps)")
                return self.result()
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.total_steps}")
        self.write_run_files()
        self.tensorboard = open_tensorboard(self)
        self.log(f"training {self.task.describe(self.model)} on {self.task.train_size} images, {self.total_steps} "
                 f"steps of {describe_batch(self.batch_size)} ({self.num_epochs} epochs), {self.precision} on "
                 f"{self.device}")
        try:
            while not self.finished:
                self.run_epoch()
        except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, SIGTERM, a full disk: the run is resumable
            if has_checkpoint(self.run_dir) or (self.run_dir / RUN_CONFIG).is_file():
                self.log(f"{describe_stop(e)}; continue with: {self.task.command} --resume {self.run_dir}")
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        return self.result()

    def result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.metrics.rows, self.step_log.rows)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_order(self) -> torch.Tensor:
        """This rank's share of the epoch's order of the training examples, on the device: torch's
        DistributedSampler draw (seed + epoch), so global batch k is the same whatever the number of ranks."""
        return shard_permutation(self.task.train_size, seed=self.config.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size, drop_last=True).to(self.device)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, object]:
        """One optimizer step (`vitlab.speed.TrainStep`, the path `vitlab bench` times): (loss, outputs)."""
        return self.train_step_fn(batch.inputs, batch)

    def run_epoch(self) -> None:
        """Train one pass over the data (or what is left of the run), then evaluate and save."""
        bs, first = self.global_batch, self.step
        start = self.step - self.epoch * self.steps_per_epoch  # > 0 when resumed from a mid-epoch checkpoint
        batches = self.task.batches(self.epoch_order, epoch=self.epoch, start=start, batch_size=self.batch_size,
                                    step=self.step)
        carried, self.carried = self.carried, {}  # a mid-epoch checkpoint's sums so far (rank 0 holds them)
        loss_sum = torch.full((), carried.get("loss", 0.0), device=self.device)
        correct = None if carried.get("correct") is None else torch.tensor(carried["correct"], device=self.device)
        bar = tqdm(total=min(self.steps_per_epoch - start, self.total_steps - first) * bs, unit="img", unit_scale=True,
                   desc=f"epoch {self.epoch + 1}/{self.num_epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.progress and self.is_main), mininterval=1.0)
        self.model.train()
        t_epoch, stopped = self.clock(), False
        for i in range(start, self.steps_per_epoch):
            if self.step >= self.total_steps:
                break
            if self.budget is not None and agreed(self.budget.should_stop(units=self.step_units(self.step))):
                stopped = True
                self.log(f"time budget reached at step {self.step}/{self.total_steps}; stopping")
                break
            batch = next(batches)
            self.lr = self.schedule.apply(self.optimizer, self.step)
            loss, outputs = self.train_step(batch)
            self.step += 1
            loss = self.guard.observe(self, loss)  # DivergedError at a NaN/Inf (or, skip mode, the loss to count)
            loss_sum += loss
            n_right = self.task.correct(outputs, batch)
            if n_right is not None:
                correct = n_right if correct is None else correct + n_right
            self.after_step(batch, loss, outputs)
            if self.budget is not None:
                self.budget.observe_step(units=self.step_units(self.step - 1))
                if agreed(self.budget.refit_due()):
                    self.refit()
                    bar.total = min(self.steps_per_epoch - start, max(self.total_steps - first, 0)) * bs
            every = self.config.checkpoint_every
            if every and self.step % every == 0 and i + 1 < self.steps_per_epoch and self.step < self.total_steps:
                self.checkpoint(loss_sum, correct)
            bar.update(bs)
            if self.step % self.config.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.lr:.2e}", refresh=False)
        bar.close()
        done = self.step - first
        if done:
            self.log_step(loss)
        counted = self.step - self.epoch * self.steps_per_epoch  # this epoch's steps, before a resume too
        self.epoch += 1
        sums = all_reduce_sum({"loss": loss_sum, "correct": 0 if correct is None else correct})  # over the ranks
        self.epoch_stats = {
            "train_loss": sums["loss"] / (counted * self.world_size) if done else None,
            "train_acc": sums["correct"] / (counted * bs) if correct is not None else None,
            "images_per_sec": done * bs / max(self.clock() - t_epoch, 1e-9),
        }
        finished = stopped or self.step >= self.total_steps
        if not finished and self.budget is not None and \
                agreed(self.budget.should_stop(after_epoch_end=True, units=self.step_units(self.step))):
            finished = True
            self.log(f"time budget: no room for another step after this evaluation; stopping at step "
                     f"{self.step}/{self.total_steps}")
        t = self.clock()
        self.end_epoch(finished=finished)
        if self.budget is not None:
            self.budget.observe_epoch_end(self.clock() - t)
            if not finished:
                self.refit()

    def after_step(self, batch: Batch, loss: torch.Tensor, outputs) -> None:
        """After each optimizer step (`self.step` already counts it): EMA, the per-step loss log.
        Per-step scalars (TensorBoard) go here; the non-finite guard runs just before (`NonFiniteGuard`)."""
        if self.ema is not None:
            self.ema.update(self.model)
        if self.step % self.config.log_every == 0 or self.step == 1:
            self.log_step(loss)
        if self.tensorboard is not None:
            self.tensorboard.after_step(self)

    def log_step(self, loss: torch.Tensor) -> None:
        """A point of steps.jsonl (every log_every steps, the first and each epoch's last)."""
        if not self.step_log.rows or self.step_log.rows[-1]["step"] != self.step:
            self.step_log.append({"step": self.step, "epoch": self.epoch + 1, "loss": round(loss.item(), 5),
                                  "lr": self.lr, "elapsed_s": round(self.elapsed(), 3)})

    def refit(self) -> None:
        """Under a time budget, move the end of the schedule to what now fits (vitlab.train.budget.Budget.fit).

        The first plan came from a few timed steps; a shared machine can run slower or faster since. Moving
        the end of the cosine a little at each refit keeps the schedule whole, where the hard stop would cut it.
        """
        total = agreed(self.capped(self.budget.fit(self.step)))  # rank 0's: every rank takes as many steps
        if total != self.total_steps:
            self.set_total_steps(total)
            if abs(total - self.logged_total) > max(0.05 * self.logged_total, 10):  # news, not jitter
                self.log(f"time budget: the schedule now ends at step {total} instead of {self.logged_total}")
                self.logged_total = total

    # ---- end of epoch ----------------------------------------------------------------------------------
    def end_epoch(self, *, finished: bool) -> None:
        """Evaluate, then write metrics, run dir and checkpoint (in that order: see MetricsLog)."""
        self.guard.check(self, weights=True)  # every step (and the weights) read before evaluating and saving
        t = self.clock()
        row = {"epoch": self.epoch, "step": self.step, **self.epoch_stats}
        row.update(self.task.evaluate(self.eval_model, precision=self.precision, progress=self.progress,
                                      final=finished))
        row["lr"] = self.lr
        row["elapsed_s"] = round(self.elapsed(), 2)
        self.metrics.append(row)
        self.finished = finished
        rng = gather_rng(self.generators)  # every rank's (a collective)
        if self.is_main:
            self.metrics.write()
            self.step_log.write()
            self.save(self.run_dir, elapsed=row["elapsed_s"], rng=rng)
        self.after_eval(row, seconds=self.clock() - t)

    def after_eval(self, row: dict, *, seconds: float) -> None:
        """After each evaluation + save: curves.png and the log line. Per-evaluation callbacks (TensorBoard
        scalars and images) go here."""
        if not self.is_main:
            return
        if self.plot_curves(self.run_dir, self.metrics.rows) is None and not self.noted_no_plot:
            self.log("matplotlib is not installed: no curves.png (pip install 'vitlab[plot]')")
            self.noted_no_plot = True
        shown = [f"{k} {row[k]:.4f}" if "loss" in k else f"{k} {row[k]:.2%}"
                 for k in ("train_loss", "train_acc", "test_loss", "test_top1", "val_top1") if row.get(k) is not None]
        left = "" if self.finished else f", ~{self.minutes_left(seconds):.1f} min left"
        self.log(f"epoch {self.epoch}  step {self.step}  {'  '.join(shown)}  lr {self.lr:.2e}  "
                 f"{row['images_per_sec']:.0f} img/s  ({row['elapsed_s'] / 60:.1f} min{left}; "
                 f"eval+save {seconds:.1f} s)")
        if self.tensorboard is not None:
            self.tensorboard.after_eval(self)

    def minutes_left(self, eval_s: float) -> float:
        """From the last epoch's speed (to the deadline under a time budget)."""
        if self.budget is not None:
            return max(self.budget.left(), 0.0) / 60
        steps = self.total_steps - self.step
        train_s = steps * self.global_batch / max(self.epoch_stats["images_per_sec"], 1e-9)
        return (train_s + math.ceil(steps / self.steps_per_epoch) * eval_s) / 60

    def plot_curves(self, run_dir: Path, rows: list[dict]) -> Path | None:
        plots = figures()
        if plots is None or not rows:
            return None
        fig = plots.plot_curves(rows, title=f"{self.run_dir.name}: {self.task.describe(self.model)}")
        return plots.save_figure(fig, run_dir / CURVES_PNG)

    def checkpoint(self, loss_sum: torch.Tensor, correct: torch.Tensor | None) -> None:
        """A mid-epoch checkpoint (config.checkpoint_every): what a resume needs, without evaluating, with the
        epoch's training loss and accuracy sums so far (over the ranks)."""
        rng = gather_rng(self.generators)
        sums = all_reduce_sum({"loss": loss_sum, "correct": 0 if correct is None else correct})
        sums = {"loss": sums["loss"] / self.world_size, "correct": None if correct is None else int(sums["correct"])}
        if self.is_main:
            self.step_log.write()
            self.write_checkpoint(self.run_dir, elapsed=round(self.elapsed(), 2), rng=rng, epoch_sums=sums)

    def save(self, run_dir: Path, *, elapsed: float = 0.0, rng: dict | None = None) -> None:
        """The run's weights (EMA when on) as the task's model dir, then the resumable checkpoint."""
        self.task.save(self.ema.module if self.ema is not None else self.model, run_dir)
        self.write_checkpoint(run_dir, elapsed=elapsed, rng=rng)

    def write_checkpoint(self, run_dir: Path, *, elapsed: float, rng: dict | None = None,
                         epoch_sums: dict | None = None) -> None:
        """`rng`: every rank's generator states (`gather_rng`), default this process's; `epoch_sums`: a
        mid-epoch checkpoint's training sums."""
        opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
        tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors,
                   "rng": rng if rng is not None else rng_states(self.generators)}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        state = {"epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
                 "schedule": self.schedule.state_dict(), "optimizer": opt_meta,
                 "ema_updates": self.ema.updates if self.ema is not None else 0,
                 "elapsed_s": elapsed, "finished": self.finished,
                 "budget": self.budget.state_dict() if self.budget is not None else None,
                 "guard": self.guard.state_dict(), "task": self.task.state_dict(), "world_size": self.world_size,
                 "epoch_sums": epoch_sums or {}}
        save_checkpoint(run_dir, tensors=tensors, state=state)
