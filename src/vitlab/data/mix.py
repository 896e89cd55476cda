"""Soft targets: label smoothing, and mixup / cutmix of whole batches (timm's `Mixup` in batch mode)."""

from __future__ import annotations

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """int labels (B,) -> float targets (B, num_classes): 1 - eps + eps/K on the label, eps/K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, reproducible from `generator` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    generator: torch.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability `prob`, mix each sample with its partner in the reversed batch (x.flip(0)).

    One of mixup or cutmix per batch (cutmix with `switch_prob` when both alphas are > 0), lambda from
    Beta(alpha, alpha). Cutmix pastes a box covering about 1 - lambda of the image, clipped at the border,
    and then sets lambda to the area actually kept, so the targets match the pixels. Inputs are not modified.
    """
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    u = torch.rand(2, generator=generator, device=generator.device).tolist()
    if not (use_mixup or use_cutmix) or u[0] >= prob:
        return x, targets
    cutmix = use_cutmix and (not use_mixup or u[1] < switch_prob)
    lam = sample_beta(cutmix_alpha if cutmix else mixup_alpha, generator)
    if cutmix:
        y0, y1, x0, x1 = _cutmix_box(x.shape[-2], x.shape[-1], lam, generator)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])
    else:
        x = x * lam + x.flip(0) * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam)


def _cutmix_box(H: int, W: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box of sides sqrt(1 - lam) * (H, W) at a uniform random centre, clipped to the image."""
    ratio = (1.0 - lam) ** 0.5
    h, w = int(H * ratio), int(W * ratio)
    u = torch.rand(2, generator=generator, device=generator.device).tolist()
    cy, cx = int(u[0] * H), int(u[1] * W)
    return max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
