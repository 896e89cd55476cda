"""The shared training loop: `Trainer` runs any `Task`; `start(kind, config, out)` and `resume(kind, run_dir)` are
written once for every kind of run: ViT and CNN-teacher classification (`vitlab.train.classification`, `vitlab
train`) and CLIP / SigLIP (`vitlab.clip.train`, `vitlab train-clip`).

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

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from vitlab.errors import VitlabError
from vitlab.rundir import RUN_CONFIG
from vitlab.speed import TrainStep
from vitlab.train.budget import Budget
from vitlab.train.callbacks import Callback, EmaUpdate, Report
from vitlab.train.checkpoint import (
    check_record,
    gather_rng,
    has_checkpoint,
    seed_rank,
)
from vitlab.train.distributed import (
    all_reduce_sum,
    get_rank,
    get_world_size,
    quiet_on_lost_peer,
    rank0_decides,
    shard_permutation,
)
from vitlab.train.ema import ModelEma
from vitlab.train.guard import LR_FACTOR, Decision, DivergedError, NonFiniteGuard, claim_run_dir, describe_stop
from vitlab.train.lock import UnstartedRun
from vitlab.train.metrics import STEPS, MetricsLog
from vitlab.train.optim import WarmupCosine, create_optimizer, warmup_steps
from vitlab.train.parallel import (
    agreed,
    batch_sizes,
    data_parallel,
    describe_batch,
    joins_torchrun,
    restarted_run,
)
from vitlab.train.recipes import RunConfig
from vitlab.train.runstate import mid_epoch_checkpoint, plan_run, refit, restore, write_checkpoint, write_run_files
from vitlab.train.task import Batch, Task
from vitlab.train.tensorboard import open_tensorboard
from vitlab.weights import read_json


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]  # one row per epoch, as in metrics.jsonl
    steps: list[dict] = field(default_factory=list)  # the loss every log_every steps, as in steps.jsonl
    task: Task | None = None  # what was trained (its model, data)
    global_batch: int = 0  # images per step over all processes

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def test_top1(self) -> float:
        return self.final.get("test_top1", float("nan"))


# ---- any task: written once --------------------------------------------------------------------------------
class RunKind(Protocol):
    """What `start` / `resume` need of a kind of run: a Task class (its `open` builds the task) does."""

    kind: str
    config_class: type[RunConfig]

    def open(self, config: RunConfig, *, run_dir: Path, device: torch.device, data: str | Path | None,
             download: bool | None, **run) -> Task: ...


@joins_torchrun  # under torchrun: this rank's device, in the job's process group
def start(task: RunKind, config: RunConfig, out: str | Path, *, data: str | Path | None = None, device: str = "auto",
          progress: bool = True, download: bool | None = None, record: dict | None = None,
          log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> TrainResult:
    """Train a new run of `task` into `out` (which must not already hold a run; `resume` continues one).

    `record`: extra fields for train_config.json; `started_at`: the `time.perf_counter()` reading the time
    budget counts from (the CLI gives the process start); default now.
    """
    if restarted_run(out):  # torchrun restarted this job (--max-restarts): go on from its checkpoint
        return resume(task, out, data=data, device=device, progress=progress, log=log, started_at=started_at)
    run_dir = check_new_run_dir(out)
    started_at = time.perf_counter() if started_at is None else started_at
    opened = task.open(config, run_dir=run_dir, device=device, data=data, download=download, progress=progress,
                       log=log, started_at=started_at)
    record = {"task": task.kind, **(record or {}), "config": opened.config.to_dict()}
    return Trainer(opened, run_dir, record=record, progress=progress, log=log, started_at=started_at).run()


@joins_torchrun
def resume(task: RunKind, run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto",
           progress: bool = True, log: Callable[[str], None] = tqdm.write,
           started_at: float | None = None) -> TrainResult:
    """Continue the run of `task` in `run_dir` from its last checkpoint, exactly as if it had never stopped."""
    run_dir, record, config = read_run(run_dir, task.config_class, task)
    data = data if data is not None else record.get("data", {}).get("root")
    opened = task.open(config, run_dir=run_dir, device=device, data=data, download=None, progress=progress, log=log,
                       started_at=started_at)
    return Trainer(opened, run_dir, record=record, progress=progress, log=log, resuming=True,
                   started_at=started_at).run()


def check_new_run_dir(out: str | Path) -> Path:
    run_dir = Path(out)
    if (run_dir / RUN_CONFIG).exists() or has_checkpoint(run_dir):
        raise VitlabError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    return run_dir


def read_run(run_dir: str | Path, config_class: type[RunConfig],
             task_class: RunKind) -> tuple[Path, dict, RunConfig]:
    """(run dir, its train_config.json, the config in it) of a run of `task_class`'s kind, for resuming."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"cannot resume: {run_dir} is not a directory")
    record = check_record(read_json(run_dir / RUN_CONFIG), run_dir / RUN_CONFIG)
    kind = record.get("task", "classify")  # runs from before tasks were recorded are classification
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
    """State of one run of a `Task`; `run()` trains it to the end. Read top to bottom: setup, loop, epoch end.
    Reporting hooks in as callbacks (`on_step`, `on_eval`, `on_end`: vitlab.train.callbacks)."""

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
                                          optimizer=c.optimizer, layer_decay=task.layer_decay())
        self.train_step_fn = TrainStep(task.train_module(self.model), self.optimizer, precision=self.precision,
                                       compile=c.compile, clip_grad=c.grad_clip, loss_fn=task.loss,
                                       track_grad_norm=True, skip_nonfinite=c.on_nonfinite == "skip")
        self.ema = ModelEma(self.model, decay=c.ema) if c.ema else None
        data_parallel(self.train_step_fn)  # several processes: DDP averages the gradients over them
        self.guard = NonFiniteGuard(c.on_nonfinite, every=1 if self.device.type == "cpu" else c.log_every,
                                    run_dir=self.run_dir, lr=c.lr, grad_clip=c.grad_clip)  # NaN/Inf: stop or skip
        # per process and over all processes: --batch-size per process; a resumed run keeps its global batch
        self.batch_size, self.global_batch = batch_sizes(c.batch_size, task.train_size, record.get("plan"))
        self.steps_per_epoch = max(1, task.train_size // self.global_batch)  # drop the last partial batch, as timm
        self.total_steps = self.capped(max(1, round(c.epochs * self.steps_per_epoch)))  # a budget refits it
        self.schedule = WarmupCosine(c.lr, self.total_steps, self.warmup_steps(self.total_steps), c.min_lr,
                                     decay=c.decay)
        # relative cost of a step at each input size (progressive resizing), measured by probe_step
        self.step_cost: dict = {size: 1.0 for size in task.input_sizes()}
        self.budget = Budget(c.time_budget * 60, steps_per_epoch=self.steps_per_epoch, clock=clock, start=self.t0,
                             work=self.work if len(self.step_cost) > 1 else None) if c.time_budget else None
        task.set_schedule(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        self.metrics, self.step_log = MetricsLog(self.run_dir), MetricsLog(self.run_dir, STEPS, columns=None)
        self.step, self.epoch, self.elapsed_before, self.finished, self.lr = 0, 0, 0.0, False, c.lr
        self.started = False  # the first step began: from then on the run dir is kept whatever happens
        self.epoch_stats: dict = {}  # train_loss, train_acc, images_per_sec of the last epoch
        self.carried: dict = {}  # training sums of the epoch a mid-epoch checkpoint was taken in
        self.logged_total = self.total_steps  # the schedule length last reported in the log
        self.callbacks: list[Callback] = []  # called at on_step / on_eval / on_end (vitlab.train.callbacks)

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
        return warmup_steps(self.config, total, self.steps_per_epoch)

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

    # ---- the loop --------------------------------------------------------------------------------------
    @quiet_on_lost_peer  # a peer process gone: one line, not a chain of tracebacks
    def run(self) -> TrainResult:
        """Train to the end, the only writer of the run dir (`vitlab.train.guard.claim_run_dir`). Rank 0's
        refusals stop every rank at once; a new run that fails before its first step leaves the dir as it was."""
        with unstarted_undone(self) as undo, ExitStack() as held:  # the lock (held) is released first
            rank0_decides(lambda: claim(self, held, undo))
            return self.run_locked()

    def run_locked(self) -> TrainResult:
        plan_run(self)
        if self.resuming and has_checkpoint(self.run_dir):
            restore(self)
            if self.finished:
                self.log(f"{self.run_dir} is already complete ({self.epoch} epochs, {self.step} steps)")
                return self.result()
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.total_steps}")
            note_world_size(self)
        tb = rank0_decides(lambda: (write_run_files(self), open_tensorboard(self))[1])  # rank 0 writes
        self.callbacks = [*([EmaUpdate(self.ema)] if self.ema is not None else []), Report(), *filter(None, [tb])]
        self.log(f"training {self.task.describe(self.model)} on {self.task.train_size} images, {self.total_steps} "
                 f"steps of {describe_batch(self.batch_size)} ({self.num_epochs} epochs), {self.precision} on "
                 f"{self.device}")
        self.started = True
        try:
            while not self.finished:
                self.run_epoch()
        except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, SIGTERM, a full disk: the run is resumable
            if has_checkpoint(self.run_dir) or (self.run_dir / RUN_CONFIG).is_file():
                self.log(f"{describe_stop(e)}; continue with: {self.task.command} --resume {self.run_dir}")
            raise
        finally:
            for callback in self.callbacks:
                callback.on_end(self)
        return self.result()

    def result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.metrics.rows, self.step_log.rows, self.task, self.global_batch)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_order(self) -> torch.Tensor:
        """This rank's share of the epoch's order (DistributedSampler's draw: batch k the same on any world size)."""
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
            step_fn = self.train_step_fn
            decision = self.obey(self.guard.observe(self.step, loss, step_fn.grad_norm, skipped=step_fn.skipped))
            loss = self.guard.counted(loss, decision)  # skip mode: a skipped step counts the last taken one's loss
            loss_sum += loss
            n_right = self.task.correct(outputs, batch)
            if n_right is not None:
                correct = n_right if correct is None else correct + n_right
            self.after_step(batch, loss, outputs)
            if self.budget is not None:
                self.budget.observe_step(units=self.step_units(self.step - 1))
                if agreed(self.budget.refit_due()):
                    refit(self)
                    bar.total = min(self.steps_per_epoch - start, max(self.total_steps - first, 0)) * bs
            every = self.config.checkpoint_every
            if every and self.step % every == 0 and i + 1 < self.steps_per_epoch and self.step < self.total_steps:
                mid_epoch_checkpoint(self, loss_sum, correct)
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
                refit(self)

    def after_step(self, batch: Batch, loss: torch.Tensor, outputs) -> None:
        """After each optimizer step (`self.step` counts it): the per-step loss log, the callbacks (EMA first)."""
        if self.step % self.config.log_every == 0 or self.step == 1:
            self.log_step(loss)
        for callback in self.callbacks:
            callback.on_step(self)

    def obey(self, decision: Decision) -> Decision:
        """Act on the non-finite guard's decision: stop the run, or lower the learning rate after a skipped step."""
        if decision is Decision.STOP:
            raise DivergedError(self.guard.reason)
        if decision is Decision.SKIP:
            self.schedule = self.schedule.scaled(LR_FACTOR)
            self.log(f"{self.guard.reason}; peak learning rate lowered to {self.schedule.base_lr:.3g}")
        return decision

    def log_step(self, loss: torch.Tensor) -> None:
        """A point of steps.jsonl (every log_every steps, the first and each epoch's last)."""
        if not self.step_log.rows or self.step_log.rows[-1]["step"] != self.step:
            self.step_log.append({"step": self.step, "epoch": self.epoch + 1, "loss": round(loss.item(), 5),
                                  "lr": self.lr, "elapsed_s": round(self.elapsed(), 3)})

    # ---- end of epoch ----------------------------------------------------------------------------------
    def end_epoch(self, *, finished: bool) -> None:
        """Evaluate, then write metrics, run dir and checkpoint (in that order: see MetricsLog)."""
        self.obey(self.guard.check(self.step, model=self.model))  # all steps and the weights read before saving
        t = self.clock()
        row = {"epoch": self.epoch, "step": self.step, **self.epoch_stats}
        row.update(self.task.evaluate(self.eval_model, precision=self.precision, progress=self.progress,
                                      final=finished))
        row.update(lr=self.lr, elapsed_s=round(self.elapsed(), 2))
        self.metrics.append(row)
        self.finished = finished
        rng = gather_rng(self.generators)  # every rank's (a collective)
        if self.is_main:
            self.metrics.write()
            self.step_log.write()
            self.save(self.run_dir, elapsed=row["elapsed_s"], rng=rng)
        for callback in self.callbacks:
            callback.on_eval(self, row, seconds=self.clock() - t)

    def save(self, run_dir: Path, *, elapsed: float = 0.0, rng: dict | None = None) -> None:
        """The run's weights (EMA when on) as the task's model dir, then the resumable checkpoint."""
        self.task.save(self.ema.module if self.ema is not None else self.model, run_dir)
        write_checkpoint(self, run_dir, elapsed=elapsed, rng=rng)


@contextmanager
def unstarted_undone(trainer: Trainer) -> Iterator[UnstartedRun | None]:
    """Rank 0 of a new run: if the block fails before the first step, the run dir is left as it was found."""
    undo = UnstartedRun(trainer.run_dir) if trainer.is_main and not trainer.resuming else None
    try:
        yield undo
    except BaseException:
        if undo is not None and not trainer.started:
            undo.undo()
        raise


def claim(trainer: Trainer, held: ExitStack, undo: UnstartedRun | None) -> None:
    """Rank 0: hold the run dir's lock until `held` closes; a new run checks again that no run started there."""
    how = "--resume" if trainer.resuming else "--out"
    held.enter_context(claim_run_dir(trainer.run_dir, command=f"{trainer.task.command} {how} {trainer.run_dir}",
                                     log=trainer.log))
    if undo is not None:
        undo.held()
        check_new_run_dir(trainer.run_dir)  # a run may have started here since train() looked


def note_world_size(trainer: Trainer) -> None:
    """A run resumed on another number of processes says what that changes."""
    before = (trainer.record.get("launch") or {}).get("world_size", 1)
    if before != trainer.world_size:
        trainer.log(f"{trainer.run_dir} ran on {before} process(es), now on {trainer.world_size}: it continues with "
                    f"the same global batch of {trainer.global_batch}, but not bit-exactly (each process draws its "
                    f"own random numbers, and the gradients are summed in another order)")
