"""`load_dataset(name, root, split)`: one entry point for the CLI and trainer, whatever the source."""

from __future__ import annotations

from pathlib import Path

from vitlab.data.cifar import load_cifar10, load_cifar100
from vitlab.data.dataset import ImageDataset
from vitlab.data.folder import load_image_folder
from vitlab.data.paths import resolve_data_dir
from vitlab.errors import VitlabError

DATASETS = ("cifar10", "cifar100", "folder")


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    download: bool | None = None,
    image_size: int = 32,
    cache_dir: str | Path | None = None,
    allow_empty_classes: bool = False,
) -> ImageDataset:
    """Load `split` of dataset `name` ("cifar10", "cifar100" or "folder") from `root`.

    `root` None means `$VITLAB_DATA`, else the per-user cache dir. `image_size` and `cache_dir` only apply to
    image folders (CIFAR is always 32x32); `download` only to CIFAR: None (default) downloads a missing
    dataset into the cache dir, True into any `root`, False never (see vitlab.data.cifar).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "cifar10":
        return load_cifar10(root, split, download=download)
    if key == "cifar100":
        return load_cifar100(root, split, download=download)
    if key in ("folder", "imagefolder"):
        return load_image_folder(resolve_data_dir(root, "folder"), split, size=image_size, cache_dir=cache_dir,
                                 allow_empty_classes=allow_empty_classes)
    raise VitlabError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
