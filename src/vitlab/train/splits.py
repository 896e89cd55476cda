"""The data a run trains and evaluates on: train / optional held-out val / test, and normalisation stats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitlab.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    ImageDataset,
    load_dataset,
    resolve_data_dir,
)
from vitlab.train.recipes import TrainConfig

KNOWN_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
VAL_SEED_OFFSET = 7919  # the val split uses its own generator, so it never shifts the training order


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    root: Path

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def info(self, dataset: str) -> dict:
        return {"dataset": dataset, "root": str(self.root), "train_size": len(self.train),
                "val_size": len(self.val) if self.val is not None else 0, "test_size": len(self.test),
                "image_size": self.train.image_size, "classes": self.classes,
                "mean": list(self.mean), "std": list(self.std)}


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W) scaled to [0, 1]."""
    x = images.transpose(0, 1).reshape(3, -1).double() / 255  # (3, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def subset(ds: ImageDataset, index: torch.Tensor) -> ImageDataset:
    return ImageDataset(ds.images[index], ds.labels[index], ds.classes)


def load_splits(config: TrainConfig, data: str | Path | None = None, *, download: bool | None = None) -> Splits:
    """Load train and test of `config.dataset`, hold out `val_split` of train, apply the subsets.

    The validation images are a seeded random draw (seed = config.seed), the same on every resume.
    `download`: CIFAR only; None downloads a missing dataset into the cache dir (vitlab.data.cifar).
    With `data_mode` "stream" an image folder stays on disk (vitlab.train.streaming).
    """
    from vitlab.train.streaming import folder_image_size, stream_splits  # it builds on this module

    if getattr(config, "data_mode", "memory") == "stream":
        return stream_splits(config, data)
    root = resolve_data_dir(data, config.dataset)
    kw = {"download": download} if config.dataset.startswith("cifar") else {
        "image_size": folder_image_size(config), "allow_empty_classes": getattr(config, "allow_empty_classes", False)}
    train = load_dataset(config.dataset, root, "train", **kw)
    test = load_dataset(config.dataset, root, "test", **kw)
    val = None
    if config.val_split > 0:
        n_val = max(1, round(config.val_split * len(train)))
        g = torch.Generator().manual_seed(config.seed + VAL_SEED_OFFSET)
        perm = torch.randperm(len(train), generator=g)
        val = subset(train, perm[:n_val].sort().values)
        train = subset(train, perm[n_val:].sort().values)
    if config.train_subset:
        train = subset(train, torch.arange(min(config.train_subset, len(train))))
    if config.test_subset:
        test = subset(test, torch.arange(min(config.test_subset, len(test))))
    mean, std = KNOWN_STATS.get(config.dataset) or channel_stats(train.images)
    return Splits(train, val, test, tuple(mean), tuple(std), root)
