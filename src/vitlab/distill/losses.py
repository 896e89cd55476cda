"""DeiT's distillation losses (Touvron et al. 2021, eq. 2 and 3) for a ViT with a distillation token.

hard: 0.5 CE(class head, target) + 0.5 CE(distillation head, argmax of the teacher)
soft: (1 - alpha) CE(class head, target) + alpha tau^2 KL(softmax(teacher / tau) || softmax(dist / tau))
A model without a distillation token (one head) distils through that head: the same formulas with the
class head in both places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.speed import soft_cross_entropy

DISTILL_MODES = ("hard", "soft")


def distillation_loss(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
                      teacher_logits: torch.Tensor, *, mode: str = "hard", alpha: float = 0.5,
                      tau: float = 1.0) -> torch.Tensor:
    """outputs: (class logits, distillation logits) or one logits tensor (B, K); target: labels (B,) or soft
    targets (B, K) (label smoothing, mixing); teacher_logits (B, K)."""
    cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    base = soft_cross_entropy(cls_logits, target)
    teacher_logits = teacher_logits.detach().float()
    if mode == "hard":
        return 0.5 * base + 0.5 * F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
    if mode == "soft":
        kl = F.kl_div(F.log_softmax(dist_logits.float() / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                      reduction="batchmean", log_target=True)
        return (1 - alpha) * base + alpha * tau**2 * kl
    raise ValueError(f"distillation mode {mode!r} unknown; choose one of {DISTILL_MODES}")
