"""One linear layer through oneDNN for bf16 on CPU: bias, exact GELU or a residual add in the matmul's epilogue.

On CPU, `F.linear` with a bias is an addmm that first copies the broadcast bias into the output (a whole
extra pass), `F.gelu` is a second pass (its erf is compute-bound) and a residual add a third. oneDNN's
linear, the op inductor's frozen CPU graphs call, applies them from the fp32 accumulator instead
(benchmarks/RESULTS.md has the timings). Anything it can't take (fp32, GPU, torch.compile, a torch
without the op) takes plain torch, so the result is the same function either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def fused_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_OP is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and not torch.compiler.is_compiling())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:  # x W^T + b + residual, the add in the epilogue too
        return _OP.binary(x, residual, weight, bias, "add")
    return _OP(x, weight, bias, act, [], "none" if act == "gelu" else "")  # "none": exact erf GELU


class _FusedLinear(torch.autograd.Function):
    """act(x W^T + b) (+ residual) forward in one oneDNN call; backward as addmm's (+ GELU's), in plain torch."""

    @staticmethod
    def forward(ctx, x, weight, bias, act, residual):
        ctx.save_for_backward(x, weight, bias)
        ctx.act = act
        return _onednn(x, weight, bias, act, residual)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        g_res = grad if ctx.needs_input_grad[4] else None  # the residual passes through unchanged
        if ctx.act == "gelu":  # recompute the pre-activation: one small matmul, not a stored (B, N, 4D) tensor
            grad = torch.ops.aten.gelu_backward(grad, _onednn(x, weight, bias, "none"))
        g2 = grad.reshape(-1, grad.shape[-1])  # (B*N, out)
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, g_res


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b; GELU(x W^T + b) with `gelu`; residual + x W^T + b with `residual` (not both)."""
    if gelu and residual is not None:
        raise ValueError("linear fuses either gelu or a residual add, not both")
    if fused_ok(x, weight) and (residual is None or (residual.dtype == x.dtype
                                                     and residual.shape[:-1] == x.shape[:-1])):
        return _FusedLinear.apply(x, weight, bias, "gelu" if gelu else "none", residual)
    y = F.linear(x, weight, bias)
    if residual is not None:
        return residual + y
    return F.gelu(y) if gelu else y
