"""A small CNN teacher for CIFAR in the style of airbench (Keller Jordan's CIFAR-10 speed runs).

image (B, 3, 32, 32) -> whitening 2x2 conv (fixed, from the data's patch covariance) -> GELU
-> 3 x [3x3 conv -> 2x2 max-pool -> BatchNorm -> GELU -> 3x3 conv -> BatchNorm -> GELU]
-> global max-pool -> Linear -> logits (B, num_classes) / 9 (airbench's output scale)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError, check_fields
from vitlab.model.hub import PretrainedMixin

WHITEN = 2  # kernel size of the whitening conv


@dataclass
class TeacherConfig:
    widths: tuple[int, int, int] = (64, 256, 256)  # airbench94's; the recipes use narrower ones
    num_classes: int = 10
    in_channels: int = 3
    bn_momentum: float = 0.4  # PyTorch's convention (weight of the new batch), airbench's 0.6 in its own
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) <= 0 or self.num_classes <= 0:
            raise VitlabError(f"invalid TeacherConfig: need 3 positive widths and num_classes > 0, got "
                              f"widths {self.widths}, num_classes {self.num_classes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TeacherConfig:
        check_fields(cls, d, "TeacherConfig")
        return cls(**d)

    def summary(self, params: int | None = None) -> str:
        size = f" ({params / 1e6:.2f}M params)" if params is not None else ""
        return f"{self.name or 'teacher'} CNN {'/'.join(map(str, self.widths))}{size}"


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))  # (B, C, H/2, W/2)
        return F.gelu(self.norm2(self.conv2(x)))


class TeacherNet(PretrainedMixin, nn.Module):
    model_type = "vitlab_teacher_cnn"
    config_class = TeacherConfig

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = 2 * cfg.in_channels * WHITEN**2  # the whitening filters and their negatives
        self.whiten = nn.Conv2d(cfg.in_channels, width, WHITEN, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by `init_whitening`, then fixed
        chans = (width, *cfg.widths)
        self.groups = nn.Sequential(*(ConvGroup(a, b, cfg.bn_momentum) for a, b in zip(chans[:-1], chans[1:])))
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes, bias=False)
        for m in self.groups.modules():
            if isinstance(m, nn.Conv2d):  # airbench: the first input channels pass through at init (dirac)
                n = min(m.in_channels, m.out_channels)
                torch.nn.init.dirac_(m.weight.data[:n])

    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the fixed first conv from normalised training images (N, C, H, W)."""
        with torch.no_grad():
            w = whitening_weights(images.float(), eps=eps).to(self.whiten.weight)
            self.whiten.weight.copy_(torch.cat([w, -w]))

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))  # (B, 24, 31, 31)
        x = self.groups(x)  # (B, C, 3, 3)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # (B, C)
        return self.head(x) / 9  # (B, num_classes)


def whitening_weights(images: torch.Tensor, *, eps: float = 5e-4) -> torch.Tensor:
    """ZCA-style filters for 2x2 patches: eigenvectors of the patch covariance / sqrt(eigenvalue + eps).

    (C*4, C, 2, 2): a conv with these weights gives patch coordinates with unit variance along each
    principal direction.
    """
    c = images.shape[1]
    patches = images.unfold(2, WHITEN, 1).unfold(3, WHITEN, 1)  # (N, C, H-1, W-1, 2, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * WHITEN**2).double()  # (M, C*4)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    w = eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)  # (C*4, C*4)
    return w.flip(0).reshape(-1, c, WHITEN, WHITEN).float()  # largest first
