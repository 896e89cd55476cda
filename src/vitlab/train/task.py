"""What a kind of training brings to the shared loop: a `Task` (model, batches, loss, evaluation, saving).

`vitlab train` runs a `ClassifyTask` (vitlab.train.classify), `vitlab train-clip` a `ClipTask`
(vitlab.clip.train); resume, the time budget, metrics, checkpoints, EMA and progress come from `Trainer`.
A new kind of run (distillation, another data source) is a new Task, or a subclass overriding a method.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.speed import resolve_precision
from vitlab.train.parallel import first_per_node
from vitlab.train.recipes import RunConfig


@dataclass
class Batch:
    """One training batch, on the device."""

    inputs: Any  # what the train module's forward takes: images (B, 3, H, W), or (images, token ids) for CLIP
    targets: Any  # what `Task.loss` compares the outputs with, e.g. soft targets (B, K)
    labels: torch.Tensor | None  # (B,) hard labels where a train accuracy means something, else None
    size: int  # images in the batch (img/s)


class Task:
    """The task-specific half of a run. `Trainer` calls, in order:

    build_model -> train_module (what `vitlab.speed.TrainStep` runs) -> per step: batch(index, step),
    loss(outputs, batch) inside the step, correct(outputs, batch) -> per epoch end: evaluate(model),
    save(model, run_dir). `generators` are saved in every checkpoint, so augmentation resumes exactly.
    """

    kind: ClassVar[str]  # recorded in train_config.json: --resume checks it is given the right kind of run
    command: ClassVar[str]  # the CLI command that trains (and resumes) this kind of run
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "bf16-pure")
    config_class: ClassVar[type[RunConfig]] = RunConfig  # what `vitlab.train.loop.resume` reads back

    def __init__(self, config: RunConfig, *, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.generators: dict[str, torch.Generator] = {}

    @classmethod
    def open(cls, config: RunConfig, *, device: torch.device, data: str | Path | None = None,
             download: bool | None = None, **run) -> Task:
        """The task of a run (`vitlab.train.loop.start` / `resume`), loaded on each machine's first process first
        (a download or a decode cache is made once per node). `run`: the run's dir, log, ... for kinds that
        need them."""
        return first_per_node(lambda: cls(config, device=device, data=data, download=download))

    # ---- sizes the loop plans with ---------------------------------------------------------------------
    @property
    def train_size(self) -> int:
        raise NotImplementedError

    @property
    def eval_size(self) -> int:
        """Images one `evaluate` looks at (the time budget scales a timed slice by it)."""
        raise NotImplementedError

    def resolve_precision(self, precision: str) -> str:
        p = resolve_precision(precision, device=self.device)
        if p not in self.precisions:
            raise VitlabError(f"{self.kind} runs support precision {', '.join(self.precisions)}, not {p!r}")
        return p

    # ---- model -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model at its initial weights (seeded from config.seed; a fine-tuning source would load here)."""
        raise NotImplementedError

    def train_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward(batch.inputs) the training step runs; shares `model`'s parameters."""
        return model

    def describe(self, model: nn.Module) -> str:
        """One line for the log: what is being trained."""
        return type(model).__name__

    # ---- steps of unequal cost (progressive resizing) ---------------------------------------------------
    def set_schedule(self, *, total_steps: int, steps_per_epoch: int) -> None:
        """The run's length, whenever it is planned or moved (a schedule over steps reads it)."""

    def input_sizes(self) -> list[int | None]:
        """The input sizes the batches take over the run; the time budget times a step at each."""
        return [None]

    def step_size(self, step: int) -> int | None:
        """The input size of step `step`."""
        return None

    def final_eval_passes(self) -> int:
        """Passes over the evaluation set the final evaluation makes (test-time augmentation: one per view); the
        time budget keeps room for the extra ones."""
        return 1

    def layer_decay(self) -> float | None:
        """Per-layer learning-rate decay of the optimizer (fine-tuning), None for one rate."""
        return None

    def work(self, step: int, total: int, cost: dict) -> float:
        """Steps `step`..`total`-1 in units of a step at the last input size, `cost[size]` each."""
        return float(total - step)

    # ---- one step --------------------------------------------------------------------------------------
    def batch(self, index: torch.Tensor, step: int, *, size: int | None = None) -> Batch:
        """The batch of training examples `index` (on the device) at optimizer step `step` (0-based).

        `step` lets a schedule change the batch (e.g. a lower resolution early on); `size` forces one of
        `input_sizes()` (to time it). Anything random must come from `self.generators`, so a resumed run sees
        the same batches.
        """
        raise NotImplementedError

    def batches(self, order: Callable[[], torch.Tensor], *, epoch: int, start: int, batch_size: int,
                step: int) -> Iterator[Batch]:
        """This rank's batches of epoch `epoch` from its batch `start` on, the first at optimizer step `step`.

        `order()` is this rank's share of the epoch's permutation (the loop's `epoch_order`); the default cuts
        it into `batch` calls. A task reading its data from disk streams it instead (vitlab.train.streaming).
        """
        index = order()
        for i in itertools.count(start):
            yield self.batch(index[i * batch_size:(i + 1) * batch_size], step + i - start)

    def state_dict(self) -> dict:
        """JSON state saved in each checkpoint beside the loop's (e.g. a data stream's position)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` from a checkpoint, before training goes on."""

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The training loss of the train module's outputs; `batch.inputs` is there for losses that need it."""
        raise NotImplementedError

    def correct(self, outputs: Any, batch: Batch) -> torch.Tensor | None:
        """Correctly classified training examples in the batch (a 0-d tensor, no host sync), or None."""
        return None

    # ---- epoch end -------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, precision: str, progress: bool = False,
                 limit: int | None = None, final: bool = False) -> dict[str, float]:
        """Metrics of `model` for metrics.jsonl ("test_top1", "test_loss", ...); `limit`: first N images only;
        `final`: the run's last evaluation (which may add metrics, e.g. with test-time augmentation)."""
        raise NotImplementedError

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write the model dir (the weights others load) into `run_dir`."""
        raise NotImplementedError

    def write_run_files(self, run_dir: Path) -> None:
        """Files written once per start, beside train_config.json (e.g. preprocessor_config.json)."""

    def record(self, model: nn.Module) -> dict:
        """What train_config.json says about the data and the model."""
        return {}
