"""How vitlab runs a training step fast on the device at hand: precision, compilation, the step itself.

One `TrainStep` is used by the trainer and by `vitlab bench`, so the benchmark times exactly the
path `vitlab train` takes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# fp32: fp32 everything. bf16: autocast (fp32 weights, bf16 matmuls). bf16-pure: a bf16 copy of the model
# runs forward and backward (bf16 weights, activations and gradients), the optimizer steps fp32 master
# weights (the model itself), and the copy is refreshed from them before every step.
PRECISIONS = ("fp32", "bf16", "bf16-pure", "auto")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # oneDNN bf16 kernels (AVX512-BF16 / AMX) make bf16 matmuls far faster than fp32
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, *, device: torch.device) -> str:
    """'auto' -> the fastest safe choice for the device (measured, benchmarks/RESULTS.md).

    CPU with oneDNN bf16 (AVX512-BF16 / AMX): bf16-pure, fastest for every width we measured (48 to 384)
    and as accurate as fp32 on CIFAR-10; GPU with bf16: autocast, the standard mixed precision there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if not bf16_supported(device):
        return "fp32"
    return "bf16-pure" if device.type == "cpu" else "bf16"


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast for the bf16 precisions (a no-op on bf16-pure's bf16 copy; used to evaluate its fp32
    weights at bf16 speed), nothing for fp32."""
    device = torch.device(device)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard labels (B,) or soft targets (B, K) from mixup/label smoothing."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class TrainStep:
    """forward + loss + backward + clip + optimizer step, optionally compiled.

    `model` always holds the fp32 weights the optimizer updates (and that are saved and evaluated);
    with precision "bf16-pure" forward and backward run on a bf16 copy whose gradients are copied back.
    Returns (loss, logits) detached, with no host sync: the caller decides when to read them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                 compile: bool = False, clip_grad: float | None = 1.0,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = soft_cross_entropy) -> None:
        if precision not in PRECISIONS or precision == "auto":
            raise ValueError(f"TrainStep needs a resolved precision (fp32, bf16, bf16-pure), got {precision!r}")
        self.model, self.optimizer = model, optimizer
        self.device = next(model.parameters()).device
        self.precision = precision
        self.clip_grad = clip_grad
        self.loss_fn = loss_fn
        self.compute = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16-pure" else model
        self.master = [p for p in model.parameters() if p.requires_grad]
        self.low = [p for p in self.compute.parameters() if p.requires_grad]
        self.forward = torch.compile(self.compute) if compile else self.compute

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pure = self.compute is not self.model
        if pure:
            with torch.no_grad():  # weights may have changed (optimizer, resume, EMA swap): recast them
                torch._foreach_copy_(self.low, self.master)
            self.compute.train(self.model.training)
            images = images.to(torch.bfloat16)
        with autocast(self.precision, self.device):
            logits = self.forward(images)
            loss = self.loss_fn(logits, target)
        loss.backward()
        if pure:
            for m, p in zip(self.master, self.low):
                m.grad, p.grad = p.grad.float() if p.grad is not None else None, None
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.master, self.clip_grad, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

# On CPU a large inference batch runs faster in slices whose (images, tokens, width) bf16 activations stay
# near the size of the cores' L2 caches (2 x 2 MiB here): S/4 at batch 256 goes ~1.3x faster in slices of 64,
# Ti/4 ~1.1x in slices of 128, the 48-wide seed model needs no slicing (benchmarks/RESULTS.md). Images are
# independent at inference, so slicing changes no result.
CPU_SLICE_BYTES = 3 << 20


def cache_chunk(model: nn.Module, device: torch.device) -> int:
    """Images per slice for `inference_forward` (a vitlab ViT on CPU); unbounded elsewhere."""
    cfg = getattr(model, "cfg", None)
    if device.type != "cpu" or cfg is None or not hasattr(cfg, "num_tokens"):
        return 1 << 62
    return max(1, CPU_SLICE_BYTES // (cfg.num_tokens * cfg.width * 2))


def inference_forward(model: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A no-grad forward for inference in `precision`, returning fp32 outputs.

    bf16-pure runs a bf16 copy of the model (no per-call weight casts, half the memory traffic), on CPU in
    cache-sized slices of the batch (`cache_chunk`); bf16
    uses autocast over the fp32 model; fp32 runs it as is. The copy is taken now: later weight changes
    of `model` are not seen.
    """
    device = next(model.parameters()).device
    if precision == "bf16-pure":
        # a torch.compile wrapper is copied as the module it wraps: its compiled code belongs to fp32 weights
        low = copy.deepcopy(getattr(model, "_orig_mod", model)).to(torch.bfloat16).eval()
        chunk = cache_chunk(model, device)

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = x.to(torch.bfloat16)
                if x.shape[0] <= chunk:
                    return low(x).float()
                return torch.cat([low(c) for c in x.split(chunk)]).float()
        return forward
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return model(x).float()
    return forward


def default_mode(device: torch.device) -> dict:
    """The mode `vitlab train` uses unless told otherwise: {'precision': ..., 'compile': ...}.

    torch.compile stays opt-in: on CPU it needs a C++ toolchain and ~20 s to start, and for bf16-pure it is
    no faster than eager here (Ti/4 230 vs 230 img/s): eager already runs the linear layers through oneDNN
    with bias and GELU fused (model/onednn.py), while inductor's own GELU kernels are slower than ATen's.
    """
    return {"precision": resolve_precision("auto", device=device), "compile": False}
