"""AdamW with the usual ViT parameter groups, and the per-step warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything that should not shrink towards zero.

    No decay on norms and biases (ndim <= 1: decaying a LayerNorm gain or a bias only fights the
    normalisation) nor on what `model.no_weight_decay()` names (class token, positions: decay would pull
    them to zero and erase position information). Same rule as timm's `param_groups_weight_decay`.
    Each group also carries the parameter `names`, for inspection.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay
        target[0].append(name)
        target[1].append(p)
    return [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
    ]


def create_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) over `param_groups(model)`."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, weight_decay=weight_decay)]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate per optimizer step: linear warmup to `base_lr`, then cosine down to `min_lr`.

    step s (0-based) of `total_steps`:
      s <  W: base_lr * (s + 1) / W             (the first step already moves; step W-1 is at base_lr)
      s >= W: min_lr + (base_lr - min_lr) * (1 + cos(pi * (s - W) / (total_steps - W))) / 2
    so the cosine starts at base_lr at s = W and would reach min_lr one step after the last.
    A pure function of the step: resuming only needs the step count.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        W, T = self.warmup_steps, max(self.total_steps, 1)
        if step < W:
            return self.base_lr * (step + 1) / W
        progress = min((step - W) / max(T - W, 1), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for `step`; returns it."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr
