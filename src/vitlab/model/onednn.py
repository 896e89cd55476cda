"""Linear layers through oneDNN for bf16 on CPU: bias, GELU and residual adds fused into the matmul.

On CPU, `F.linear` with a bias is an addmm that first copies the broadcast bias into the output and then
accumulates the product onto it (a whole extra pass, ~45% of a bf16 Ti/4 linear here), and `F.gelu` is a
second pass at ~1 G elements/s (its erf is compute-bound). oneDNN's linear, the op inductor's frozen CPU
graphs call, applies bias and exact-erf GELU in the matmul's epilogue from the fp32 accumulator: for
Ti/4's fc1 it takes 4.5 ms where linear + GELU take ~20 ms (benchmarks/RESULTS.md); a block's residual
adds go into the epilogues of `proj` and `fc2` the same way. It is used for bf16 tensors on CPU when torch
ships the op; everything else (fp32, GPU, torch.compile) takes `F.linear`, so fp32 results stay bit-equal
to timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def _fused_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
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


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that takes the fused oneDNN route for bf16 on CPU."""

    def forward(self, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b; GELU(x W^T + b) with `gelu`; residual + x W^T + b with `residual` (not both)."""
        if gelu and residual is not None:
            raise ValueError("Linear fuses either gelu or a residual add, not both")
        if _fused_ok(x, self.weight) and (residual is None or (residual.dtype == x.dtype
                                                               and residual.shape[:-1] == x.shape[:-1])):
            return _FusedLinear.apply(x, self.weight, self.bias, "gelu" if gelu else "none", residual)
        y = F.linear(x, self.weight, self.bias)
        if residual is not None:
            return residual + y
        return F.gelu(y) if gelu else y
