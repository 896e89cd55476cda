"""Which precision a run uses on the device at hand, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch

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

    CPU with oneDNN bf16 (AVX512-BF16 / AMX): bf16-pure, the fastest for every width measured and as accurate
    as fp32 on CIFAR-10; GPU with bf16: autocast, the standard mixed precision there.
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


def default_mode(device: torch.device) -> dict:
    """The mode `vitlab train` uses unless told otherwise: {'precision': ..., 'compile': ...}.

    torch.compile stays opt-in: on CPU it needs a C++ toolchain and ~20 s to start, and for bf16-pure it is
    no faster than the eager fused path (benchmarks/RESULTS.md).
    """
    return {"precision": resolve_precision("auto", device=device), "compile": False}
