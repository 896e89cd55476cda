"""Test-time augmentation: average the logits over flipped and shifted views (airbench's flip + translate).

    views(x, "flip")            original, horizontal flip
    views(x, "flip-translate")  + both shifted one pixel up-left and down-right (reflect-padded), and their flips
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "flip-translate")
TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 6}  # forward passes per image


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, C, H, W) moved by (dy, dx) pixels, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    H, W = x.shape[-2:]
    return padded[..., p - dy:p - dy + H, p - dx:p - dx + W]


def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode not in TTA_MODES:
        raise ValueError(f"TTA mode {mode!r} unknown; choose one of {', '.join(TTA_MODES)}")
    base = [x] if mode == "none" else [x, x.flip(-1)]
    if mode == "flip-translate":
        base += [v for s in (shift(x, -1, -1), shift(x, 1, 1)) for v in (s, s.flip(-1))]
    return base


def view_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """`forward`'s logits of each view of `mode`; the first is the image itself (the plain prediction)."""
    return [forward(v) for v in views(x, mode)]


def tta_forward(forward: Callable[[torch.Tensor], torch.Tensor], mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward that returns the mean of `forward`'s logits over the views of `mode` (the identity for "none")."""
    if mode == "none":
        return forward
    return lambda x: torch.stack(view_logits(forward, x, mode)).mean(0)
