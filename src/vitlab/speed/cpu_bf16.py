"""The bf16 fast path on CPU, applied by a module swap: `fuse_for_cpu_bf16(model)`.

In the spirit of torch's quantization swaps, it changes the class of every `Block`, `Attention` and `Mlp`
in `model` (and a Swin's `WindowAttention`: ~1.35x its training img/s) in place to a subclass whose forward
runs faster kernels on bf16 CPU tensors:
- linear layers through oneDNN with the bias, the exact GELU (fc1) and the block's residual add
  (proj, fc2) in the matmul epilogue (`onednn.linear`);
- attention as explicit bf16 matmuls + softmax while training, since the fused (flash) SDPA backward in
  bf16 is several times slower on CPU (benchmarks/RESULTS.md).
Parameters, buffers and the state dict are untouched, and for any other dtype or device each fused
module computes exactly what its plain parent does. `speed.TrainStep` and `speed.inference_forward`
apply it to the bf16 copy of the model they run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.model.swin import WindowAttention
from vitlab.model.vit import Attention, Block, Mlp
from vitlab.speed import onednn


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None,
                       dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with plain bf16 matmuls (no fp32 copies)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(scores.dtype)
    return F.dropout(scores.softmax(dim=-1), dropout_p, training=dropout_p > 0) @ v


def _explicit_is_faster(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and q.requires_grad


class FusedAttention(Attention):
    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, return_attention: bool = False,
                residual: torch.Tensor | None = None):
        """(residual +) attention(x); `return_attention` takes the plain path (it needs fp32 probabilities)."""
        if return_attention:
            out, probs = super().forward(x, attn_mask=attn_mask, return_attention=True)
            return (out if residual is None else residual + out), probs
        B, N, D = x.shape
        qkv = onednn.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        drop = self.attn_drop if self.training else 0.0
        if _explicit_is_faster(q):
            out = explicit_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        if residual is not None and not (self.training and self.proj_drop.p > 0):
            return onednn.linear(out, self.proj.weight, self.proj.bias, residual=residual)
        out = self.proj_drop(onednn.linear(out, self.proj.weight, self.proj.bias))
        return out if residual is None else residual + out


class FusedMlp(Mlp):
    fuse_gelu: bool  # set by the swap: exact GELU can run inside fc1's matmul

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) fc2(act(fc1(x)))."""
        if self.fuse_gelu:
            h = onednn.linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        else:
            h = self.act(onednn.linear(x, self.fc1.weight, self.fc1.bias))
        h = self.drop(h)  # (B, N, hidden)
        if residual is not None and not (self.training and self.drop.p > 0):
            return onednn.linear(h, self.fc2.weight, self.fc2.bias, residual=residual)
        out = self.drop(onednn.linear(h, self.fc2.weight, self.fc2.bias))
        return out if residual is None else residual + out


class FusedWindowAttention(WindowAttention):
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_attention: bool = False):
        """Swin's window attention with oneDNN linears and, while training in bf16, explicit attention."""
        if return_attention or not onednn.fused_ok(x, self.qkv.weight):
            return super().forward(x, mask=mask, return_attention=return_attention)
        BW, N, C = x.shape
        qkv = onednn.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(BW, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (BW, h, N, hd)
        bias = self.attention_bias(mask, BW).to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        attend = explicit_attention if _explicit_is_faster(q) else F.scaled_dot_product_attention
        out = attend(q, k, v, attn_mask=bias, dropout_p=drop).transpose(1, 2).reshape(BW, N, C)
        return self.proj_drop(onednn.linear(out, self.proj.weight, self.proj.bias))


class FusedBlock(Block):
    fuse_residual: bool  # set by the swap: nothing (LayerScale, stochastic depth) sits between branch and add

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, return_attention: bool = False):
        if return_attention:
            return super().forward(x, attn_mask=attn_mask, return_attention=True)
        if self.fuse_residual:  # the adds go into the epilogues of proj and fc2
            x = self.attn(self.norm1(x), attn_mask=attn_mask, residual=x)
            return self.mlp(self.norm2(x), residual=x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def fuse_for_cpu_bf16(model: nn.Module) -> nn.Module:
    """Swap vitlab's Block / Attention / Mlp / WindowAttention modules in `model` for their fused subclasses;
    returns `model`."""
    for m in model.modules():
        if type(m) is Block:
            m.__class__ = FusedBlock
            m.fuse_residual = all(isinstance(s, nn.Identity) for s in (m.ls1, m.ls2, m.drop_path1, m.drop_path2))
        elif type(m) is Attention:
            m.__class__ = FusedAttention
        elif type(m) is WindowAttention:
            m.__class__ = FusedWindowAttention
        elif type(m) is Mlp:
            m.__class__ = FusedMlp
            m.fuse_gelu = isinstance(m.act, nn.GELU) and m.act.approximate == "none"
    return model

