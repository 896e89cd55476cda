"""TensorBoard event files for a run (`--tensorboard`): RUN_DIR/tb/, the same numbers as metrics.jsonl and
steps.jsonl, plus the attention rollout of a few fixed test images at each evaluation.

Scalars, at the optimizer step they belong to: every point of steps.jsonl as `step/<key>` (`step/loss`,
`step/lr`), every evaluation row of metrics.jsonl as `<split>/<name>` for train_/test_/val_ keys
(`train/loss`, `train/acc`, `test/top1`, ...) and `epoch/<key>` for the rest (`epoch/lr`,
`epoch/images_per_sec`). Image `attention/rollout`: `vitlab explain`'s rollout figure
(`vitlab.inspect.plots.plot_rollout`) of the first `ROLLOUT_IMAGES` test images, drawn from the weights being
evaluated. Only rank 0 writes. `torch.utils.tensorboard` needs the `tensorboard` package (the optional
`vitlab[tensorboard]` extra); without it the run goes on without event files and says so in one line.

Resuming from step S opens a new event file with TensorBoard's purge marker at S: whatever the stopped
process wrote from step S on is hidden, and S itself (its last evaluation) is written again from the
restored state, so the curves have neither gaps nor duplicated steps.
"""

from __future__ import annotations

import io
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vitlab.data import normalize
from vitlab.errors import VitlabError
from vitlab.inspect.attention import (
    ATTENTION_POOLINGS,
    ROLLOUT_CAPTIONS,
    attention_rollout,
    forward_with_attention,
    pooling_attention,
    rollout_map,
    to_grid,
)
from vitlab.inspect.explain import is_swin, prediction_labels, window_probe_figure
from vitlab.train.callbacks import Callback
from vitlab.train.metrics import figures

if TYPE_CHECKING:
    from vitlab.train.loop import Trainer

TB_DIR = "tb"  # RUN_DIR/tb: `tensorboard --logdir RUN_DIR/tb` (or a folder of runs)
ROLLOUT_TAG = "attention/rollout"
ROLLOUT_IMAGES = 6  # the first test images: few enough to read at a glance, the same ones at every evaluation
FLUSH_SECS = 10  # per-step points reach the files (and a live TensorBoard) within this, not torch's 120 s
SPLITS = ("train", "test", "val")
NOT_SCALARS = ("epoch", "step")  # the x axis, not curves


def scalar_tag(key: str, *, group: str) -> str:
    """metrics.jsonl key -> tag: "test_top1" -> "test/top1", "lr" -> "<group>/lr"."""
    split, _, name = key.partition("_")
    return f"{split}/{name}" if group == "epoch" and split in SPLITS and name else f"{group}/{key}"


def scalars(row: dict, *, group: str) -> dict[str, float]:
    """The numeric entries of a metrics row (None and the step/epoch counters left out), by tag."""
    return {scalar_tag(k, group=group): float(v) for k, v in row.items()
            if k not in NOT_SCALARS and isinstance(v, int | float) and not isinstance(v, bool)}


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT whose attention is drawn: the model itself, or a CLIP / SigLIP model's image tower."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module
    return getattr(model, "vision", model)


class RolloutProbe:
    """The fixed test images of a run and their attention rollout under given weights."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images, self.labels, self.classes = images[:ROLLOUT_IMAGES].cpu(), labels[:ROLLOUT_IMAGES].cpu(), classes
        self.x = normalize(self.images, mean, std)  # (B, 3, H, W): the evaluation's input, no augmentation

    @torch.no_grad()
    def maps(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rollout maps (B, gh, gw), class probabilities (B, K) or None for a model without a classifier)."""
        vit = vision_tower(model)
        cfg, p = vit.cfg, vit.num_prefix_tokens
        feats, attns = forward_with_attention(vit, self.x)
        pool = pooling_attention(vit, feats) if cfg.pooling in ATTENTION_POOLINGS else None
        flow = rollout_map(attention_rollout(attns, num_prefix_tokens=p), pooling=cfg.pooling, num_prefix_tokens=p,
                           pool_attention=pool)  # (B, Np)
        probs = vit.forward_head(feats).float().softmax(-1).cpu() if cfg.num_classes else None
        return to_grid(flow.cpu(), (cfg.grid_size, cfg.grid_size)), probs

    def figure(self, model: torch.nn.Module, *, step: int):
        """`vitlab explain`'s rollout figure of the fixed images, predictions (where the model has a classifier)
        beside the true classes; None without matplotlib."""
        plots = figures()
        if plots is None:
            return None
        if is_swin(vision_tower(model)):  # no rollout across Swin's windows: the attention inside one window instead
            return window_probe_figure(vision_tower(model), self.images, self.x, self.labels, self.classes, step=step)
        heat, probs = self.maps(model)
        confidence, preds = probs.max(-1) if probs is not None else (None, None)
        labels = prediction_labels(self.classes, self.labels, preds, confidence)
        pooling = vision_tower(model).cfg.pooling
        return plots.plot_rollout(self.images, heat, labels=labels,
                                  title=f"step {step}: attention rollout ({pooling} pooling): "
                                        f"{ROLLOUT_CAPTIONS[pooling]}")

    def image(self, model: torch.nn.Module, *, step: int) -> np.ndarray | None:
        """The figure as the PNG `save_figure` would write, decoded: uint8 (H, W, 3); None without matplotlib."""
        fig = self.figure(model, step=step)
        if fig is None:
            return None
        from vitlab.inspect.plots import DPI

        buf = io.BytesIO()
        fig.savefig(buf, dpi=DPI, format="png")
        return np.asarray(Image.open(buf).convert("RGB"))


class TensorBoardLog(Callback):
    """A run's event files: `on_step` and `on_eval` write what the loop has just logged."""

    def __init__(self, writer, probe: RolloutProbe | None, *, start: int) -> None:
        self.writer, self.probe = writer, probe
        self.step_done = self.eval_done = start - 1  # the last step written; from `start` on, all is (re)written

    def on_step(self, trainer: Trainer) -> None:
        rows = trainer.step_log.rows
        if rows and rows[-1]["step"] > self.step_done:  # a new point of steps.jsonl
            self.write_steps(rows)

    def write_steps(self, rows: list[dict]) -> None:
        for row in rows:
            if row["step"] > self.step_done:
                for tag, v in scalars(row, group="step").items():
                    self.writer.add_scalar(tag, v, row["step"])
        self.step_done = rows[-1]["step"]

    def on_eval(self, trainer: Trainer, row: dict | None = None, *, seconds: float = 0.0) -> None:
        if trainer.step_log.rows:
            self.write_steps(trainer.step_log.rows)  # the epoch's last point, logged after the last step
        for row in trainer.metrics.rows:
            if row["step"] > self.eval_done:
                for tag, v in scalars(row, group="epoch").items():
                    self.writer.add_scalar(tag, v, row["step"])
                self.eval_done = row["step"]
                if self.probe is not None and row["step"] == trainer.step:  # only the current weights can be drawn
                    img = self.probe.image(trainer.eval_model, step=trainer.step)
                    if img is not None:
                        self.writer.add_image(ROLLOUT_TAG, img, trainer.step, dataformats="HWC")
        self.writer.flush()  # an evaluation's numbers are on disk before the next epoch starts

    def on_end(self, trainer: Trainer | None = None) -> None:
        try:
            self.writer.close()
        except OSError as e:  # the disk filled or the folder went: said in one line, the run's own error goes on
            if trainer is not None:
                trainer.log(f"TensorBoard: the last events were not written ({e.strerror or e})")


def check_writable(tb: Path) -> None:
    """RUN_DIR/tb must be a folder this process can write in, checked with a real file before the writer's
    thread starts (where a failure would be a traceback, and the path bytes)."""
    if tb.exists() and not tb.is_dir():
        raise VitlabError(f"--tensorboard: cannot write event files in {tb}: it is a file, not a folder")
    try:
        tb.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=tb):
            pass
    except OSError as e:
        raise VitlabError(f"--tensorboard: cannot write event files in {tb}: {e.strerror or e}") from None


def _quiet_writer_threads() -> None:
    """The event writer's thread dies with a traceback when a write fails; the training thread gets the same
    error at its next write and reports it in one line, so the thread's own print is dropped."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread" or not isinstance(args.exc_value, OSError):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def open_tensorboard(trainer: Trainer) -> TensorBoardLog | None:
    """The run's TensorBoard log from `trainer.step` on (after any restore), or None: not asked for, not rank 0,
    or the package missing (one line in the log)."""
    if not trainer.config.tensorboard or not trainer.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        trainer.log(f"tensorboard is not installed: no event files for --tensorboard, metrics.jsonl/csv as usual "
                    f"(pip install 'vitlab[tensorboard]'; {e})")
        return None
    splits = getattr(trainer.task, "splits", None)
    probe = None
    if splits is not None:
        probe = RolloutProbe(splits.test.images, splits.test.labels, splits.classes, mean=splits.mean, std=splits.std)
    if probe is not None and figures() is None:
        trainer.log("matplotlib is not installed: no rollout images in TensorBoard (pip install 'vitlab[tensorboard]')")
    check_writable(trainer.run_dir / TB_DIR)
    _quiet_writer_threads()
    writer = SummaryWriter(str(trainer.run_dir / TB_DIR), purge_step=trainer.step, flush_secs=FLUSH_SECS)
    tb = TensorBoardLog(writer, probe, start=trainer.step)
    if trainer.step:  # resumed: the restored step's evaluation, and anything the purge marker hid, again
        tb.on_eval(trainer)
    return tb
