"""The data a run trains and evaluates on: train / optional held-out val / test, and normalisation stats;
an image folder streamed from disk (`data_mode` "stream") as `StreamedSplit`s."""

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
from vitlab.data.folder import decode_image
from vitlab.data.stream import scan_folder
from vitlab.errors import VitlabError
from vitlab.train.recipes import RunConfig, TrainConfig

KNOWN_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
VAL_SEED_OFFSET = 7919  # the val split uses its own generator, so it never shifts the training order


STATS_IMAGES = 1000  # training images (a seeded sample) the normalisation statistics are measured on
FOLDER_SIZE = 32  # image-folder side when the config's image_size is 0


def folder_image_size(config: TrainConfig) -> int:
    """The side image folders are decoded to: config.image_size, 32 when it is 0."""
    return config.image_size or FOLDER_SIZE


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


def load_splits(config: RunConfig, data: str | Path | None = None, *, download: bool | None = None,
                image_size: int = 0, allow_empty_classes: bool = False) -> Splits:
    """Load train and test of `config.dataset`, hold out `val_split` of train, apply the subsets.

    The validation images are a seeded random draw (seed = config.seed), the same on every resume.
    `download`: CIFAR only; None downloads a missing dataset into the cache dir (vitlab.data.cifar).
    `image_size`: the side image folders are decoded to (0: FOLDER_SIZE). `stream_splits` leaves a folder on disk.
    """
    root = resolve_data_dir(data, config.dataset)
    kw = {"download": download} if config.dataset.startswith("cifar") else {
        "image_size": image_size or FOLDER_SIZE, "allow_empty_classes": allow_empty_classes}
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


# ---- splits that stay on disk -------------------------------------------------------------------------------
@dataclass
class StreamedSplit:
    """A split of an image folder left on disk: what ClassifyTask reads of an ImageDataset at start-up
    (size, classes, image size; `images`/`labels` are empty), and where the files are."""

    root: Path
    split: str
    size: int
    classes: list[str]
    image_size: int

    def __post_init__(self) -> None:
        self.images = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        self.labels = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.size

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def sample_stats(files: list[Path], size: int, *, seed: int, n: int = STATS_IMAGES) -> tuple[tuple, tuple]:
    """Per-channel mean and std of a seeded sample of `n` files, decoded as evaluation decodes them."""
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    images = []
    for i in pick:
        try:
            images.append(torch.from_numpy(decode_image(files[i], size).copy()).permute(2, 0, 1))
        except (OSError, ValueError, VitlabError):
            continue  # unreadable: the loader skips it too
    if not images:
        raise VitlabError(f"none of {len(pick)} sampled images under {files[0].parent.parent} could be read")
    return channel_stats(torch.stack(images))


def stream_splits(config: TrainConfig, data: str | Path | None) -> Splits:
    """train / test of an image folder as StreamedSplits, the statistics from a sample of train (rank 0's)."""
    given = [name for name, value in (("val_split", config.val_split), ("train_subset", config.train_subset),
                                      ("test_subset", config.test_subset)) if value]
    if given:
        raise VitlabError(f"--{given[0].replace('_', '-')} needs the data in memory; with --data-mode stream, "
                          "give the folder the train/ and test/ (or val/) splits to use")
    if config.augment.alternate_flip:
        raise VitlabError("alternate flips follow each image through the epochs: they need --data-mode memory")
    root, size = resolve_data_dir(data, "folder"), folder_image_size(config)
    train, test = scan_folder(root, "train", allow_empty_classes=config.allow_empty_classes), scan_folder(root, "test")
    mean, std = sample_stats(train.files, size, seed=config.seed)  # the same seeded sample on every rank
    return Splits(StreamedSplit(root, "train", len(train.files), train.classes, size),
                  None, StreamedSplit(root, "test", len(test.files), train.classes, size),
                  tuple(mean), tuple(std), root)
