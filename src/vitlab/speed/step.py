"""One training step (forward, loss, backward, clip, optimizer step) in the chosen precision.

One `TrainStep` is used by the trainer and by `vitlab bench`, so the benchmark times exactly the path
`vitlab train` takes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.speed.cpu_bf16 import fuse_for_cpu_bf16
from vitlab.speed.precision import PRECISIONS, autocast


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard labels (B,) or soft targets (B, K) from mixup/label smoothing."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def bf16_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A bf16 copy of `model` (a torch.compile wrapper is copied as the module it wraps), fused on CPU."""
    low = copy.deepcopy(getattr(model, "_orig_mod", model)).to(torch.bfloat16)
    return fuse_for_cpu_bf16(low) if device.type == "cpu" else low


class TrainStep:
    """forward + loss + backward + clip + optimizer step, optionally compiled.

    `model` always holds the fp32 weights the optimizer updates (and that are saved and evaluated);
    with precision "bf16-pure" forward and backward run on a bf16 copy whose gradients are copied back.
    With "bf16" on CPU the model's own modules are swapped for the fused ones (same outputs in fp32).
    Returns (loss, logits) detached, with no host sync: the caller decides when to read them. The global
    gradient norm (before clipping) is kept in `grad_norm`: computed when clipping, or with `track_grad_norm`
    (one more pass over the gradients), else None. `skip_nonfinite`: the update is skipped (`skipped` True)
    when the loss or the gradient norm is NaN/Inf, at one host sync per step (vitlab.train.guard's skip mode).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                 compile: bool = False, clip_grad: float | None = 1.0,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = soft_cross_entropy,
                 track_grad_norm: bool = False, skip_nonfinite: bool = False) -> None:
        if precision not in PRECISIONS or precision == "auto":
            raise ValueError(f"TrainStep needs a resolved precision (fp32, bf16, bf16-pure), got {precision!r}")
        self.model, self.optimizer = model, optimizer
        self.device = next(model.parameters()).device
        self.precision = precision
        self.clip_grad = clip_grad
        self.loss_fn = loss_fn
        self.track_grad_norm, self.skip_nonfinite = track_grad_norm or skip_nonfinite, skip_nonfinite
        self.grad_norm: torch.Tensor | None = None  # of the last step, a 0-d tensor on the device
        self.skipped = False  # the last step's update was skipped (skip_nonfinite only)
        if precision == "bf16-pure":
            self.compute = bf16_copy(model, self.device)
        else:
            self.compute = fuse_for_cpu_bf16(model) if precision == "bf16" and self.device.type == "cpu" else model
        self.master = [p for p in model.parameters() if p.requires_grad]
        self.low = [p for p in self.compute.parameters() if p.requires_grad]
        # saved buffers (BatchNorm's running statistics) are updated by the copy's forward: carried both ways
        saved, low_buffers = model.state_dict().keys(), dict(self.compute.named_buffers())
        self.buffers = [(b, low_buffers[n]) for n, b in model.named_buffers() if n in saved] \
            if self.compute is not model else []
        self.forward = torch.compile(self.compute) if compile else self.compute

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pure = self.compute is not self.model
        if pure:
            with torch.no_grad():  # weights may have changed (optimizer, resume, EMA swap): recast them
                torch._foreach_copy_(self.low, self.master)
                for master, low in self.buffers:
                    low.copy_(master)
            self.compute.train(self.model.training)
            images = images.to(torch.bfloat16)
        with autocast(self.precision, self.device):
            logits = self.forward(images)
            loss = self.loss_fn(logits, target)
        loss.backward()
        if pure:
            with torch.no_grad():
                for master, low in self.buffers:
                    master.copy_(low)
            for m, p in zip(self.master, self.low):
                m.grad, p.grad = p.grad.float() if p.grad is not None else None, None
        self.grad_norm = None
        if self.clip_grad:
            self.grad_norm = nn.utils.clip_grad_norm_(self.master, self.clip_grad, foreach=True)
        elif self.track_grad_norm:
            self.grad_norm = nn.utils.get_total_norm([p.grad for p in self.master if p.grad is not None],
                                                     foreach=True)
        if self.skip_nonfinite:
            self.skipped = not bool(torch.isfinite(loss.detach().float() + self.grad_norm))  # the host sync
        if not self.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), torch.utils._pytree.tree_map(torch.Tensor.detach, logits)  # a tuple: both heads
