"""Batched training augmentation on the training device: crop, flip, policy, mixup/cutmix, smoothing, normalise.

The trainer keeps the dataset as one uint8 tensor and calls `BatchAugment` once per step on a (B, 3, H, W)
batch. Every random parameter is per sample and comes from the `torch.Generator` passed in, so a seed
reproduces a run. All steps are vectorised over the batch (no per-image Python), which keeps a 256-image
CIFAR batch at a few milliseconds on a CPU; see benchmarks/augment_cost.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitlab.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from vitlab.data.mix import mix_batch, smooth_one_hot
from vitlab.data.policy import POLICIES, apply_policy
from vitlab.errors import VitlabError

PADDING_MODES = ("zeros", "reflect")


@dataclass(frozen=True)
class AugmentConfig:
    """The training-augmentation recipe. Defaults are the DeiT-style ViT recipe scaled to CIFAR.

    For short CPU runs a lighter recipe (policy="none", mix_prob=0) learns faster at first; the heavy one
    pays off only over many epochs.
    """

    crop_padding: int = field(default=4, metadata={
        "help": "random crop back to the input size after padding each side by this many pixels; 0: no crop"})
    padding_mode: str = field(default="zeros", metadata={
        "help": "zeros (as torchvision's RandomCrop(32, padding=4)) | reflect: how the crop pads"})
    flip: bool = field(default=True, metadata={"help": "horizontal flips with probability 1/2"})
    alternate_flip: bool = field(default=False, metadata={
        "help": "flip each image in every other epoch (airbench; a random half in the first) instead of at random"})
    policy: str = field(default="trivial", metadata={
        "help": "augmentation policy: none | trivial (TrivialAugment-Wide) | randaug (RandAugment)"})
    randaug_n: int = field(default=2, metadata={"help": "--policy randaug: ops per image"})
    randaug_m: int = field(default=9, metadata={
        "help": "--policy randaug: magnitude level 0..30 (torchvision's scale)"})
    mixup_alpha: float = field(default=0.8, metadata={"help": "mixup Beta(alpha, alpha); 0: off"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "cutmix Beta(alpha, alpha); 0: off"})
    mix_prob: float = field(default=1.0, metadata={"help": "probability that a batch is mixed at all"})
    switch_prob: float = field(default=0.5, metadata={
        "help": "probability of cutmix rather than mixup when both are on"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the targets"})
    # set from the dataset by the trainer, so no flags
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise VitlabError(f"augmentation policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.padding_mode not in PADDING_MODES:
            raise VitlabError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, not {self.padding_mode!r}")
        if self.crop_padding < 0 or self.randaug_n < 0 or not 0 <= self.randaug_m <= 30:
            raise VitlabError("crop_padding and randaug_n must be >= 0 and randaug_m in 0..30")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise VitlabError("mixup_alpha and cutmix_alpha must be >= 0")
        if not (0 <= self.mix_prob <= 1 and 0 <= self.switch_prob <= 1 and 0 <= self.label_smoothing < 1):
            raise VitlabError("mix_prob and switch_prob must be in [0, 1], label_smoothing in [0, 1)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise VitlabError("mean and std need 3 values each, std > 0")


class BatchAugment:
    """`BatchAugment(config, num_classes=K)(images, labels, generator) -> (normalised images, soft targets)`.

    Order: random crop + flip (on the raw pixels, exact), scale to [0, 1], per-sample policy, mixup/cutmix
    on label-smoothed one-hot targets, normalise with mean/std. `eval_transform` only normalises.

    On a CPU the batch is augmented with `cpu_threads` intra-op threads (default 1, restored afterwards):
    it is a few hundred small ops, and on a busy shared CPU their thread hand-offs made 2 threads 5-10x
    slower in median than 1 (measured: ~20 ms vs ~120-280 ms per 256 CIFAR images). None keeps torch's setting.
    """

    def __init__(self, config: AugmentConfig | None = None, *, num_classes: int, cpu_threads: int | None = 1) -> None:
        self.config = config or AugmentConfig()
        self.num_classes = num_classes
        self.cpu_threads = cpu_threads

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) uint8, or float in [0, 1]; labels (B,) int64 -> (B, 3, H, W), (B, num_classes)."""
        c, g = self.config, generator if generator is not None else torch.default_generator
        with _cpu_threads(self.cpu_threads if images.device.type == "cpu" else None):
            x = random_crop_flip(images, padding=c.crop_padding, flip=c.flip, padding_mode=c.padding_mode, generator=g)
            x = to_float(x)  # (B, 3, H, W) float32 in [0, 1]
            x = apply_policy(x, c.policy, generator=g, num_ops=c.randaug_n, magnitude=c.randaug_m)
            targets = smooth_one_hot(labels, self.num_classes, c.label_smoothing)  # (B, K)
            x, targets = mix_batch(
                x, targets, generator=g, mixup_alpha=c.mixup_alpha, cutmix_alpha=c.cutmix_alpha,
                prob=c.mix_prob, switch_prob=c.switch_prob,
            )
            return normalize(x, c.mean, c.std), targets

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation: no randomness, only scaling to [0, 1] and normalising."""
        with _cpu_threads(self.cpu_threads if images.device.type == "cpu" else None):
            return normalize(images, self.config.mean, self.config.std)

    def __repr__(self) -> str:
        return f"BatchAugment({self.config}, num_classes={self.num_classes}, cpu_threads={self.cpu_threads})"


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    change = n is not None and n != previous
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(previous)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD
) -> torch.Tensor:
    """(x - mean) / std per channel, for uint8 or [0, 1] float images (B, 3, H, W); returns float32."""
    x = to_float(images)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(
    images: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    padding_mode: str = "zeros",
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-sample random crop of the padded batch back to (H, W), and horizontal flip with probability 1/2.

    Same result as torchvision's RandomCrop(H, padding) + RandomHorizontalFlip applied image by image, done
    as one gather of integer pixel offsets, so it is exact for uint8 and costs one copy of the batch.
    """
    if padding == 0 and not flip:
        return images
    B, C, H, W = images.shape
    dev, p = generator.device, padding
    oy = torch.randint(2 * p + 1, (B, 1), generator=generator, device=dev)  # top-left corner of each crop
    ox = torch.randint(2 * p + 1, (B, 1), generator=generator, device=dev)
    rows = oy + torch.arange(H, device=dev)  # (B, H) rows of the padded image
    cols = ox + torch.arange(W, device=dev)  # (B, W)
    if flip:
        flipped = torch.rand(B, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    if p:
        images = F.pad(images, (p, p, p, p), mode="constant" if padding_mode == "zeros" else "reflect")
    rows, cols = rows.to(images.device), cols.to(images.device)
    x = images.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W + 2 * p))  # (B, C, H, W + 2p)
    return x.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))  # (B, C, H, W)
