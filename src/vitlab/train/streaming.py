"""`vitlab train --dataset folder --data-mode stream`: an image folder read from disk batch by batch.

`classify_task(config, ...)` is the task `vitlab train` runs: `ClassifyTask` with the data in memory, or
`StreamTask` when `data_mode` is "stream" ("auto": stream when the decoded folder would take more than
`memory_share` of the available memory). The chosen mode is written into the run's config, so a resumed run
reads its data the same way.

StreamTask is ClassifyTask with the in-memory tensors replaced by `vitlab.data.stream.StreamLoader`s: worker
processes decode and random-resized-crop the training files into uint8 batches (each rank its shard of every
epoch's permutation), and each streamed batch then goes through ClassifyTask's own batching (the batched
on-device augmentation, a teacher, progressive resizing) as if it were the whole in-memory set. Evaluation
streams the test (or val) folder, resized and centre-cropped as the memory mode decodes it, each rank its
share, the sums all-reduced. Unreadable files are skipped and counted (`skipped_files` in metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.data import resolve_data_dir
from vitlab.data.stream import StreamLoader, choose_data_mode, scan_folder
from vitlab.errors import VitlabError
from vitlab.train.classify import ClassifyTask
from vitlab.train.distributed import all_reduce_sum, is_main
from vitlab.train.evaluate import EvalResult, evaluate, merge_results
from vitlab.train.parallel import agreed, first_per_node
from vitlab.train.recipes import TrainConfig
from vitlab.train.splits import StreamedSplit, folder_image_size
from vitlab.train.task import Batch


def resolve_data_mode(config: TrainConfig, data: str | Path | None) -> str:
    """"memory" or "stream" for this run (rank 0 decides: "auto" reads the free memory)."""
    mode = config.data_mode
    if config.dataset != "folder":
        if mode == "stream":
            raise VitlabError(f"--data-mode stream reads image folders (--dataset folder); {config.dataset} is "
                              "held in memory")
        return "memory"
    if mode == "auto":
        def count() -> int:
            root = resolve_data_dir(data, "folder")
            allow = config.allow_empty_classes
            return sum(len(scan_folder(root, s, allow_empty_classes=allow).files) for s in ("train", "test"))
        mode = agreed(choose_data_mode(mode, num_images=count(), image_size=folder_image_size(config),
                                       memory_share=config.memory_share) if is_main() else None)
    return mode


def classify_task(config: TrainConfig, *, device: torch.device, data: str | Path | None = None,
                  download: bool | None = None, **kw) -> ClassifyTask:
    """The task of `vitlab train`: ClassifyTask (memory) or StreamTask, with the mode resolved in its config.
    Under torchrun each machine's first process loads (downloads, decodes) the data before the others."""
    config = dataclasses.replace(config, data_mode=resolve_data_mode(config, data))
    cls = StreamTask if config.data_mode == "stream" else ClassifyTask
    return first_per_node(lambda: cls(config, device=device, data=data, download=download, **kw))


# ---- the task -----------------------------------------------------------------------------------------------
class StreamTask(ClassifyTask):
    """ClassifyTask on an image folder streamed from disk (see the module docstring)."""

    def __init__(self, config: TrainConfig, *, device: torch.device, **kw) -> None:
        super().__init__(config, device=device, **kw)  # load_splits gives StreamedSplits: nothing is decoded
        self.train_loader: StreamLoader | None = None  # made at the first epoch, with the loop's batch size
        self.eval_loader: StreamLoader | None = None
        self.resumed: dict | None = None  # a checkpoint's loader state, checked when the loader is made
        self.reported = 0  # skipped files already logged

    def loader(self, split: StreamedSplit, *, batch_size: int, train: bool) -> StreamLoader:
        return StreamLoader(split.root, split.split, image_size=split.image_size, batch_size=batch_size,
                            train=train, seed=self.config.seed, workers=self.config.workers,
                            pin_memory=self.device.type == "cuda",
                            allow_empty_classes=self.config.allow_empty_classes)

    def streamed(self, images: torch.Tensor, labels: torch.Tensor, step: int, *, size: int | None = None) -> Batch:
        """ClassifyTask's batch of a streamed (uint8 images, labels) batch: it stands in for the in-memory set."""
        self.images = images.to(self.device, non_blocking=True)
        self.labels = labels.to(self.device, non_blocking=True)
        return ClassifyTask.batch(self, torch.arange(len(labels), device=self.device), step, size=size)

    def batch(self, index: torch.Tensor, step: int, *, size: int | None = None) -> Batch:
        """The training files `index`, decoded here (the loop times a step with it); training reads
        `batches`, decoded by the loader's workers."""
        ds = (self.train_loader or self.loader(self.splits.train, batch_size=1, train=True)).dataset
        items = [ds[(int(i), 0)] for i in index.tolist()]
        kept = [(x, y) for x, y, _ in items if x is not None]
        if not kept:
            raise VitlabError(f"none of {len(items)} training files could be read")
        images, labels = torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept])
        return self.streamed(images, labels, step, size=size)

    def batches(self, order: Callable[[], torch.Tensor], *, epoch: int, start: int, batch_size: int,
                step: int) -> Iterator[Batch]:
        if self.train_loader is None:
            self.train_loader = self.loader(self.splits.train, batch_size=batch_size, train=True)
            if self.resumed is not None:
                self.train_loader.load_state_dict(self.resumed)  # same images, seed and global batch
                self.reported = self.train_loader.skipped  # logged by the process that met them
        loader = self.train_loader
        loader.set_epoch(epoch)
        loader.position = start  # the loader's order is a function of (seed, epoch): resuming mid-epoch is exact
        for images, labels in loader:
            self.report_skipped()
            yield self.streamed(images, labels, step)
            step += 1

    def report_skipped(self) -> None:
        loader = self.train_loader
        if loader.skipped > self.reported and loader.skipped_files and is_main():
            path, msg = next(reversed(loader.skipped_files.items()))
            tqdm.write(f"skipped {loader.skipped - self.reported} unreadable training file(s), e.g. {msg}")
        self.reported = loader.skipped

    def evaluate(self, model, *, precision: str, progress: bool = False, limit: int | None = None,
                 final: bool = False) -> dict:
        """test_* of the streamed test folder (each rank its share; `limit`: about the first N images)."""
        if self.eval_loader is None:
            self.eval_loader = self.loader(self.splits.test, batch_size=self.config.eval_batch_size, train=False)
        tta = self.config.tta if final else "none"
        results: list[EvalResult] = []
        self.eval_loader.set_epoch(0)
        seen, share = 0, None if limit is None else -(-limit // self.eval_loader.world_size)
        for images, labels in tqdm(self.eval_loader, desc="test", unit="batch", leave=False, disable=not progress):
            if len(labels):
                results.append(evaluate(model, images, labels, mean=self.splits.mean, std=self.splits.std,
                                        num_classes=self.num_classes, batch_size=len(labels), device=self.device,
                                        precision=precision, tta=tta))
            seen += len(labels)
            if share is not None and seen >= share:
                break
        if not results:  # this rank's share was empty or unreadable: it still takes part in the reduction
            results = [evaluate(model, self.splits.test.images, self.splits.test.labels, mean=self.splits.mean,
                                std=self.splits.std, num_classes=self.num_classes, device=self.device, tta=tta)]
        out = merge_results(results).metrics("test_")
        if self.train_loader is not None:  # counted on every rank, reported for the run
            out["skipped_files"] = int(all_reduce_sum({"n": self.train_loader.skipped})["n"])
        return out

    def state_dict(self) -> dict:
        return {"stream": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = state.get("stream")

    def record(self, model) -> dict:
        out = super().record(model)
        out["data"] = {**out["data"], "data_mode": "stream", "workers": self.config.workers}
        return out
