"""The in-memory dataset every loader returns: uint8 images, int64 labels, class names."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    """A whole image-classification split held in memory.

    Small datasets (CIFAR is 150 MB as uint8) fit in RAM, so the trainer indexes batches straight out of
    `images` and augments them as a batch: no per-sample Python, no DataLoader workers.
    """

    images: torch.Tensor  # (N, 3, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: list[str]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), not {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 (N,), not {labels.dtype} {tuple(labels.shape)}")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image (3, H, W) uint8, label), so the dataset also works with torch's DataLoader."""
        return self.images[index], int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return self.images.shape[-1]
