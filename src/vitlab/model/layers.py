"""Transformer building blocks from torch primitives: attention, MLP, LayerScale, DropPath, Block, MAP head.

Parameter names follow timm (`attn.qkv`, `mlp.fc1`, `ls1.gamma`, `attn_pool.latent`, ...) so state
dicts convert by renaming only. CLIP/SigLIP towers reuse these blocks through config flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import Linear


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}")


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) in fp32, the matrix fused SDPA computes but never shows."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.float()
    return scores.softmax(dim=-1)


def _explicit_is_faster(q: torch.Tensor) -> bool:
    """On CPU, the fused (flash) SDPA backward in bf16 is ~9x slower than in fp32 (torch 2.14,
    Sapphire Rapids, 65 tokens): explicit bf16 matmuls + softmax train Ti/4 ~1.7x faster (RESULTS.md)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and q.requires_grad


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by the fastest route for this device and dtype."""
    if not _explicit_is_faster(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    return F.dropout(probs, dropout_p, training=dropout_p > 0) @ v


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The default path calls `sdpa` (fused `scaled_dot_product_attention` unless explicit matmuls are
    faster on the device); with `return_attention` it computes softmax(QK^T/sqrt(d))V in fp32 so the
    probabilities can be returned.
    """

    def __init__(self, dim: int, *, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, return_attention: bool = False,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual +) attention(x), and the probabilities with `return_attention`."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        drop = self.attn_drop if self.training else 0.0
        probs = None
        if return_attention:
            probs = attention_probs(q, k, attn_mask)  # (B, H, N, N)
            out = F.dropout(probs, drop, self.training).to(v.dtype) @ v
        else:
            out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        if residual is not None and not (self.training and self.proj_drop.p > 0):
            return self.proj(out, residual=residual), probs  # the add fused into proj's matmul (onednn.py)
        out = self.proj_drop(self.proj(out))
        return (out if residual is None else residual + out), probs


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, *, activation: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.fuse_gelu = activation == "gelu"  # exact GELU can run inside fc1's matmul (onednn.py)

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) fc2(act(fc1(x)))."""
        h = self.fc1(x, gelu=True) if self.fuse_gelu else self.act(self.fc1(x))  # (B, N, hidden)
        h = self.drop(h)
        if residual is not None and not (self.training and self.drop.p > 0):
            return self.fc2(h, residual=residual)
        out = self.drop(self.fc2(h))
        return out if residual is None else residual + out


class LayerScale(nn.Module):
    """Per-channel residual branch scale (CaiT); `gamma` as in timm."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, *, heads: int, mlp_dim: int, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layerscale_init: float | None = None,
                 norm_eps: float = 1e-6, activation: str = "gelu") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, activation=activation, drop=drop)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if all(isinstance(m, nn.Identity) for m in (self.ls1, self.ls2, self.drop_path1, self.drop_path2)):
            # x + branch(x) with nothing in between: the add can go into the branch's last matmul
            x, probs = self.attn(self.norm1(x), attn_mask=attn_mask, return_attention=return_attention, residual=x)
            return self.mlp(self.norm2(x), residual=x), probs
        a, probs = self.attn(self.norm1(x), attn_mask=attn_mask, return_attention=return_attention)
        x = x + self.drop_path1(self.ls1(a))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, probs


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAP, SigLIP): a learned query attends over the tokens.

    Layout as timm's AttentionPoolLatent: `latent`, `q`, `kv`, `proj`, then a residual MLP.
    """

    def __init__(self, dim: int, *, heads: int, mlp_dim: int, norm_eps: float = 1e-6,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, activation=activation)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, H, N, hd)
        probs = None
        if return_attention:
            probs = attention_probs(q, k)  # (B, H, 1, N)
            out = probs.to(v.dtype) @ v
        else:
            out = sdpa(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        out = out + self.mlp(self.norm(out))
        return out[:, 0], probs  # (B, D)
