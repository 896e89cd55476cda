"""A no-grad forward for evaluation and prediction in the chosen precision."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitlab.speed.precision import autocast
from vitlab.speed.step import bf16_copy

# On CPU a large inference batch runs faster in slices whose (images, tokens, width) bf16 activations stay
# near the size of the cores' L2 caches (benchmarks/RESULTS.md). Images are independent at inference, so
# slicing changes no result.
CPU_SLICE_BYTES = 3 << 20


def cache_chunk(model: nn.Module, device: torch.device) -> int:
    """Images per slice for `inference_forward` (a vitlab ViT on CPU); unbounded elsewhere."""
    cfg = getattr(model, "cfg", None)
    if device.type != "cpu" or cfg is None or not hasattr(cfg, "num_tokens"):
        return 1 << 62
    return max(1, CPU_SLICE_BYTES // (cfg.num_tokens * cfg.width * 2))


def inference_forward(model: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A no-grad forward for inference in `precision`, returning fp32 outputs.

    bf16-pure runs a bf16 copy of the model (no per-call weight casts, half the memory traffic; fused
    kernels on CPU), on CPU in cache-sized slices of the batch (`cache_chunk`); bf16 uses autocast over the
    fp32 model; fp32 runs it as is. The copy is taken now: later weight changes of `model` are not seen.
    """
    device = next(model.parameters()).device
    if precision == "bf16-pure":
        low = bf16_copy(model, device).eval()
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
