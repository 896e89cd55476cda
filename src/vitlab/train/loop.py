"""The training loop: `train(config, out=RUN_DIR)` and `resume(RUN_DIR)`.

One step: index a batch of uint8 images out of the in-memory training set with this epoch's permutation
(a seeded torch.Generator), augment it on the training device, forward under optional bf16 autocast,
soft-target cross-entropy, backward, clip, AdamW step, EMA update, learning rate from the per-step
warmup + cosine schedule. After each epoch: evaluate (test, and val when held out), log metrics, write the
run dir (weights loadable by `VisionTransformer.from_pretrained`) and an all-or-nothing checkpoint.

Determinism: every random draw comes from three generators (global torch RNG for dropout / drop-path,
`data` for the epoch order, `augment` for augmentation), all seeded from `config.seed` and saved in each
checkpoint, so on one machine the same seed gives the same weights and a resumed run the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.data import BatchAugment
from vitlab.errors import VitlabError
from vitlab.model import VisionTransformer, create_model, parse_variant
from vitlab.speed import TrainStep, resolve_precision
from vitlab.train.budget import margin_s, plan_steps, seconds_per_call
from vitlab.train.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    restore_rng,
    rng_states,
    save_checkpoint,
)
from vitlab.train.ema import ModelEma
from vitlab.train.evaluate import EvalResult, evaluate
from vitlab.train.metrics import CURVES_PNG, MetricsLog, plot_curves
from vitlab.train.optim import WarmupCosine, create_optimizer
from vitlab.train.processor import write_preprocessor_config
from vitlab.train.recipes import RUN_CONFIG, TrainConfig
from vitlab.train.runtime import resolve_device
from vitlab.train.splits import Splits, load_splits
from vitlab.weights import load_into, read_json, write_json


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]  # one row per epoch, as in metrics.jsonl

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def test_top1(self) -> float:
        return self.final.get("test_top1", float("nan"))


def describe(model: VisionTransformer) -> str:
    """"seed 128w 6d 4h /4 (0.81M params)": the variant name alone hides the recipe's reshaping."""
    c = model.cfg
    return f"{c.name} {c.width}w {c.depth}d {c.heads}h /{c.patch_size} ({model.num_params() / 1e6:.2f}M params)"


def build_model(config: TrainConfig, *, image_size: int, num_classes: int) -> VisionTransformer:
    """The config's model at the data's image size and class count, initialised from `config.seed`."""
    cfg = parse_variant(config.model, **{"image_size": image_size, "num_classes": num_classes,
                                         "drop_path": config.drop_path, **config.model_args})
    return create_model(cfg, seed=config.seed)


def train(config: TrainConfig, *, out: str | Path, data: str | Path | None = None, device: str = "auto",
          progress: bool = True, download: bool = False, recipe: str = "", overrides: dict | None = None,
          log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train a new run into `out` (which must not already hold a run; use `resume` for that)."""
    run_dir = Path(out)
    if (run_dir / RUN_CONFIG).exists() or has_checkpoint(run_dir):
        raise VitlabError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    parse_variant(config.model, **config.model_args)  # a bad --model fails now, not after loading the data
    record = {"recipe": recipe, "overrides": overrides or {}, "config": config.to_dict()}
    return Trainer(config, run_dir, data=data, device=device, progress=progress, download=download,
                   record=record, log=log).run()


def resume(run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto", progress: bool = True,
           log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Continue the run in `run_dir` from its last checkpoint, exactly as if it had never stopped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"cannot resume: {run_dir} is not a directory")
    record = read_json(run_dir / RUN_CONFIG)
    try:
        config = TrainConfig.from_dict(record["config"])
    except (KeyError, TypeError) as e:
        raise VitlabError(f"{run_dir / RUN_CONFIG} does not describe a training run ({e})") from None
    return Trainer(config, run_dir, data=data if data is not None else record.get("data", {}).get("root"),
                   device=device, progress=progress, record=record, log=log, resuming=True).run()


class Trainer:
    """State of one run; `run()` trains it to the end. Read top to bottom: setup, plan, loop, epoch end."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, data, device: str, progress: bool, record: dict,
                 log: Callable[[str], None], download: bool = False, resuming: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.config, self.run_dir, self.record, self.log = config, run_dir, record, log
        self.progress, self.resuming = progress, resuming
        self.device = resolve_device(device)
        torch.manual_seed(config.seed)  # global RNG (CPU and CUDA): dropout and drop-path

        self.splits: Splits = load_splits(config, data, download=download)
        tr = self.splits.train
        self.images = tr.images.to(self.device)  # (N, 3, H, W) uint8, the whole training set
        self.labels = tr.labels.to(self.device)
        self.num_classes = tr.num_classes
        aug = dataclasses.replace(config.augment, mean=self.splits.mean, std=self.splits.std)
        self.augment = BatchAugment(aug, num_classes=self.num_classes)
        self.mixing = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mix_prob > 0

        self.model = build_model(config, image_size=tr.image_size, num_classes=self.num_classes).to(self.device)
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        self.forward = torch.compile(self.model) if config.compile else self.model  # for evaluation
        self.steps: dict[str, TrainStep] = {}  # one training step per precision (the bf16-pure copy lives there)
        self.optimizer = create_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay,
                                          betas=config.betas)
        self.data_gen = torch.Generator().manual_seed(config.seed)  # epoch order, on the CPU
        self.aug_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)

        self.batch_size = min(config.batch_size, len(tr))
        self.steps_per_epoch = max(1, len(tr) // self.batch_size)  # drop the last partial batch, as timm
        self.metrics = MetricsLog(run_dir)
        self.step, self.epoch, self.elapsed_before, self.finished = 0, 0, 0.0, False
        self.lr = config.lr
        self.noted_no_plot = False

    # ---- setup -----------------------------------------------------------------------------------------
    def plan(self) -> None:
        """Precision, number of steps and schedule: from the record when resuming, else decided now."""
        c, plan = self.config, self.record.get("plan")
        if plan is None:
            self.precision, timings = self.choose_precision()
            total = max(1, round(c.epochs * self.steps_per_epoch))
            if c.time_budget:
                timings = timings or self.time_steps([self.precision])
                total = self.fit_budget(timings[self.precision])
            warmup = min(round(c.warmup_epochs * self.steps_per_epoch), total)
            if c.time_budget:  # a budget may cut the run far below the recipe's epochs: keep warmup <= 1/5
                warmup = min(warmup, total // 5)
            plan = {"precision": self.precision, "total_steps": total, "warmup_steps": warmup,
                    "steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size,
                    "step_seconds": {k: round(v, 4) for k, v in timings.items()}}
        self.precision = plan["precision"]
        self.total_steps = plan["total_steps"]
        self.schedule = WarmupCosine(c.lr, plan["total_steps"], plan["warmup_steps"], c.min_lr)
        self.record["plan"] = plan
        self.ema = ModelEma(self.model, decay=c.ema) if c.ema else None

    def choose_precision(self) -> tuple[str, dict[str, float]]:
        """"auto" -> `vitlab.speed.resolve_precision`: the same choice `vitlab bench` times, decided by the
        device, not by a timing that load on a shared machine can flip."""
        return resolve_precision(self.config.precision, device=self.device), {}

    def time_steps(self, precisions: list[str]) -> dict[str, float]:
        """Seconds per training step in each precision, measured on the real model, then undone.

        The weights are restored, the optimizer state cleared and the RNGs forked, so measuring changes
        nothing about the run (the same seed gives the same weights with or without it).
        """
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        g = torch.Generator(device=self.device).manual_seed(0)
        x, t = self.augment(self.images[:self.batch_size], self.labels[:self.batch_size], g)
        times = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for p in precisions:
                times[p] = seconds_per_call(lambda p=p: self.train_step(x, t, p), warmup=1, repeats=2,
                                            device=self.device)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(saved[k])
        self.optimizer.state.clear()
        self.model.zero_grad(set_to_none=True)
        return times

    def epoch_overhead_s(self) -> float:
        """Seconds for one end-of-epoch evaluation (test + val) plus checkpoint, measured on a slice of test."""
        test = self.splits.test
        m = min(self.config.eval_batch_size, len(test))
        t = seconds_per_call(lambda: evaluate(self.forward, test.images[:m], test.labels[:m], mean=self.splits.mean,
                                              std=self.splits.std, num_classes=self.num_classes,
                                              batch_size=m, device=self.device, precision=self.precision),
                             warmup=1, repeats=1, device=self.device)
        n_eval = len(test) + (len(self.splits.val) if self.splits.val is not None else 0)
        ckpt_bytes = sum(p.numel() * 4 for p in self.model.parameters()) * (4 if self.config.ema else 3)
        return t * n_eval / m + 0.3 + ckpt_bytes / 100e6  # + figure and files at ~100 MB/s

    def fit_budget(self, step_s: float) -> int:
        """Steps that fit `time_budget` minutes, counting what setup has already used."""
        budget = self.config.time_budget * 60
        self.epoch_s = self.epoch_overhead_s()
        self.deadline = self.t0 + budget - margin_s(budget)
        available = self.deadline - time.perf_counter()
        steps = plan_steps(available, step_s=step_s, epoch_s=self.epoch_s, steps_per_epoch=self.steps_per_epoch)
        if steps < 1:
            raise VitlabError(f"time budget of {self.config.time_budget:g} min is too short: one step takes "
                              f"{step_s:.1f} s and one evaluation + checkpoint {self.epoch_s:.1f} s, "
                              f"{margin_s(budget):.0f} s are kept as margin and setup took "
                              f"{time.perf_counter() - self.t0:.0f} s")
        self.log(f"time budget {self.config.time_budget:g} min: {step_s:.3f} s/step, "
                 f"{self.epoch_s:.1f} s/evaluation -> {steps} steps ({steps / self.steps_per_epoch:.1f} epochs)")
        return steps

    def restore(self) -> None:
        """Load the last checkpoint: weights, optimizer, EMA, RNG states, counters, metrics so far."""
        tensors, state = load_checkpoint(self.run_dir)
        load_into(self.model, tensors["model"], source=f"{self.run_dir} checkpoint")
        self.optimizer.load_state_dict(optimizer_from_files(tensors.get("optimizer", {}), state["optimizer"]))
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"], updates=state["ema_updates"])
        restore_rng(tensors["rng"], self.generators)
        self.step, self.epoch = state["step"], state["epoch"]
        self.elapsed_before, self.finished = state["elapsed_s"], state.get("finished", False)
        self.total_steps = state["total_steps"]
        self.schedule = WarmupCosine(**state["schedule"])
        self.metrics.load()
        self.metrics.truncate(self.epoch)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_gen, "augment": self.aug_gen}

    # ---- the loop --------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, targets: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on an augmented batch (soft targets: smoothing and mixing included).

        The step itself is `vitlab.speed.TrainStep`, the path `vitlab bench` times; returns (loss, logits).
        """
        if precision not in self.steps:
            self.steps[precision] = TrainStep(self.model, self.optimizer, precision=precision,
                                              compile=self.config.compile, clip_grad=self.config.grad_clip)
        return self.steps[precision](x, targets)

    def run(self) -> TrainResult:
        self.deadline: float | None = None  # set by fit_budget: stop before it, whatever the plan said
        self.plan()
        if self.resuming and has_checkpoint(self.run_dir):
            self.restore()
            if self.finished:
                self.log(f"{self.run_dir} is already complete ({self.epoch} epochs, {self.step} steps)")
                return TrainResult(self.run_dir, self.metrics.rows)
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.total_steps}")
        self.write_run_files()
        n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.log(f"training {describe(self.model)} on "
                 f"{len(self.splits.train)} images, {self.total_steps} steps of {self.batch_size} "
                 f"({n_epochs} epochs), {self.precision} on {self.device}")
        step_times: list[float] = []
        epoch_times: list[float] = []
        try:
            while self.step < self.total_steps:
                stopped = self.run_epoch(step_times)
                if not stopped:
                    self.replan(step_times, epoch_times)
                t = time.perf_counter()
                self.end_epoch(finished=stopped or self.step >= self.total_steps)
                epoch_times.append(time.perf_counter() - t)
                if stopped:
                    break
        except KeyboardInterrupt:
            if has_checkpoint(self.run_dir):
                self.log(f"interrupted; continue with: vitlab train --resume {self.run_dir}")
            raise
        return TrainResult(self.run_dir, self.metrics.rows)

    def run_epoch(self, step_times: list[float]) -> bool:
        """Train one pass over the data (or what is left of the run); True if the time budget ran out."""
        bs = self.batch_size
        perm = torch.randperm(len(self.images), generator=self.data_gen).to(self.device)
        steps = min(self.steps_per_epoch, self.total_steps - self.step)
        n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bar = tqdm(total=steps * bs, desc=f"epoch {self.epoch + 1}/{n_epochs}", unit="img", unit_scale=True,
                   leave=False, disable=not self.progress, dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        t_epoch, done, stopped = time.perf_counter(), 0, False
        for i in range(steps):
            if self.deadline is not None and step_times and \
                    time.perf_counter() + step_times[-1] + self.epoch_s > self.deadline:
                stopped = True
                self.log(f"time budget reached at step {self.step}/{self.total_steps}; stopping")
                break
            t = time.perf_counter()
            idx = perm[i * bs:(i + 1) * bs]
            y = self.labels[idx]
            x, targets = self.augment(self.images[idx], y, self.aug_gen)  # (B, 3, H, W) float, (B, K)
            self.lr = self.schedule.apply(self.optimizer, self.step)
            loss, logits = self.train_step(x, targets, self.precision)
            if self.ema is not None:
                self.ema.update(self.model)
            loss_sum += loss
            if not self.mixing:
                correct += (logits.argmax(1) == y).sum()
            self.step += 1
            done += 1
            step_times.append(time.perf_counter() - t)
            bar.update(bs)
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.lr:.2e}", refresh=False)
        bar.close()
        self.epoch += 1
        self.epoch_stats = {
            "train_loss": (loss_sum / max(done, 1)).item() if done else None,
            "train_acc": None if self.mixing or not done else correct.item() / (done * bs),
            "images_per_sec": done * bs / max(time.perf_counter() - t_epoch, 1e-9),
        }
        return stopped

    def replan(self, step_times: list[float], epoch_times: list[float]) -> None:
        """Under a time budget, refit the remaining steps to the time left, from what the epochs really cost.

        Called after an epoch's steps, before its evaluation. The first plan came from a few timed steps; a
        shared machine can run slower or faster since. Moving the end of the cosine by a little each epoch
        keeps the schedule whole, where the hard stop in `run_epoch` would cut it.
        """
        if self.deadline is None or not step_times:
            return
        recent = sorted(step_times[-self.steps_per_epoch:])
        if epoch_times:
            self.epoch_s = sorted(epoch_times)[len(epoch_times) // 2]
        left = plan_steps(self.deadline - time.perf_counter() - self.epoch_s, step_s=recent[len(recent) // 2],
                          epoch_s=self.epoch_s, steps_per_epoch=self.steps_per_epoch)
        total = self.step + left
        if abs(total - self.total_steps) > 0.03 * self.total_steps:  # ignore timing jitter
            self.log(f"time budget: the schedule now ends at step {total} instead of {self.total_steps}")
            self.total_steps = total
            self.schedule = dataclasses.replace(self.schedule, total_steps=max(total, 1))

    # ---- end of epoch ----------------------------------------------------------------------------------
    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.forward

    def evaluate_split(self, name: str) -> EvalResult:
        ds = getattr(self.splits, name)
        return evaluate(self.eval_model, ds.images, ds.labels, mean=self.splits.mean, std=self.splits.std,
                        num_classes=self.num_classes, batch_size=self.config.eval_batch_size,
                        device=self.device, precision=self.precision, progress=self.progress, desc=name)

    def end_epoch(self, *, finished: bool) -> None:
        t = time.perf_counter()
        row = {"epoch": self.epoch, "step": self.step, **self.epoch_stats}
        row.update({f"test_{k}": v for k, v in self.evaluate_split("test").summary().items()})
        if self.splits.val is not None:
            row.update({f"val_{k}": v for k, v in self.evaluate_split("val").summary().items()})
        row["lr"] = self.lr
        row["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t0, 2)
        self.metrics.append(row)
        self.save(finished=finished, elapsed=row["elapsed_s"])
        title = f"{self.run_dir.name}: {describe(self.model)}"
        if plot_curves(self.metrics.rows, self.run_dir / CURVES_PNG, title=title) is None and not self.noted_no_plot:
            self.log("matplotlib is not installed: no curves.png (pip install 'vitlab[plot]')")
            self.noted_no_plot = True
        shown = [f"{k} {row[k]:.4f}" if "loss" in k else f"{k} {row[k]:.2%}"
                 for k in ("train_loss", "train_acc", "test_loss", "test_top1", "val_top1") if row.get(k) is not None]
        self.log(f"epoch {self.epoch}  step {self.step}  {'  '.join(shown)}  lr {self.lr:.2e}  "
                 f"{row['images_per_sec']:.0f} img/s  ({row['elapsed_s'] / 60:.1f} min; "
                 f"eval+save {time.perf_counter() - t:.1f} s)")

    def write_run_files(self) -> None:
        """train_config.json and preprocessor_config.json: everything but the weights, once per start."""
        import numpy

        from vitlab import __version__

        self.record.update({
            "data": self.splits.info(self.config.dataset),
            "model": {"variant": self.config.model, "params": self.model.num_params(),
                      "config": self.model.cfg.to_dict()},
            "device": str(self.device), "torch": torch.__version__, "numpy": numpy.__version__,
            "vitlab": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        })
        write_json(self.run_dir / RUN_CONFIG, self.record)
        write_preprocessor_config(self.run_dir, image_size=self.model.cfg.image_size, mean=self.splits.mean,
                                  std=self.splits.std)

    def save(self, *, finished: bool, elapsed: float) -> None:
        """The run's weights (EMA when on) for from_pretrained, then the resumable checkpoint."""
        run_weights = self.ema.module if self.ema is not None else self.model
        run_weights.save_pretrained(self.run_dir, class_names=self.splits.classes)
        opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
        tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors,
                   "rng": rng_states(self.generators)}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        state = {"epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
                 "schedule": self.schedule.state_dict(), "optimizer": opt_meta,
                 "ema_updates": self.ema.updates if self.ema is not None else 0,
                 "elapsed_s": elapsed, "finished": finished}
        save_checkpoint(self.run_dir, tensors=tensors, state=state)
