"""Datasets (CIFAR-10/100 in both official layouts, image folders) and batched on-device augmentation."""

from vitlab.data.augment import AugmentConfig, BatchAugment, normalize, random_crop_flip, to_float
from vitlab.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar10,
    load_cifar100,
)
from vitlab.data.dataset import ImageDataset
from vitlab.data.download import download_file
from vitlab.data.folder import IMAGE_EXTENSIONS, decode_image, load_image_folder
from vitlab.data.load import DATASETS, load_dataset
from vitlab.data.mix import mix_batch, smooth_one_hot
from vitlab.data.paths import DATA_ENV, resolve_data_dir
from vitlab.data.policy import POLICIES, apply_policy

__all__ = [
    "AugmentConfig", "BatchAugment", "normalize", "random_crop_flip", "to_float",
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "load_cifar10", "load_cifar100", "ImageDataset", "download_file",
    "IMAGE_EXTENSIONS", "decode_image", "load_image_folder", "DATASETS", "load_dataset",
    "mix_batch", "smooth_one_hot", "DATA_ENV", "resolve_data_dir", "POLICIES", "apply_policy",
]  # fmt: skip
