"""The Vision Transformer (Dosovitskiy et al. 2020), readable top to bottom in one file.

image (B, C, H, W) -> patches (B, N, D) -> [class, registers] + positions -> pre-norm blocks
-> norm -> pool (cls | gap | map) -> head -> logits (B, num_classes)

Plain `nn.Linear` and `F.scaled_dot_product_attention` throughout. Parameter names follow timm
(`patch_embed.proj`, `blocks.i.attn.qkv`, `mlp.fc1`, `ls1.gamma`, `attn_pool.latent`, ...), so state
dicts convert by renaming only. The CLIP/SigLIP text tower reuses `Block`. Faster CPU kernels for bf16
live in `vitlab.speed`, which swaps modules of a bf16 copy; nothing here knows about them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.model.flops import check_model_size
from vitlab.model.hub import PretrainedMixin
from vitlab.model.posemb import resample_grid, sincos_2d


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


class PatchEmbed(nn.Module):
    """Cut the image into PxP patches and project each to D channels (one strided conv)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.use_patch_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise VitlabError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


class ConvStem(nn.Module):
    """A convolutional tokenizer (CCT; "Early convolutions help transformers see better"): per halving of the
    resolution a 3x3 conv -> BatchNorm -> ReLU -> 3x3/2 max-pool, then a 1x1 conv to the width. It ends at
    the patchify stem's token grid (H/P x W/P), so the encoder after it is unchanged."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        chans = (cfg.in_channels, *cfg.conv_stem_channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(3, stride=2, padding=1)]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chans[-1], cfg.width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise VitlabError(f"input {H}x{W} is not divisible by the stem's downsampling {self.patch_size}")
        x = self.proj(self.convs(x))  # (B, C, H, W) -> ... -> (B, D, H/P, W/P)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) in fp32: the matrix fused attention computes but never shows."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.float()
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; optionally returns its probabilities."""

    def __init__(self, dim: int, *, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, return_attention: bool = False):
        """(B, N, D) -> (B, N, D); with `return_attention` also the probabilities (B, H, N, N)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        drop = self.attn_drop if self.training else 0.0
        if return_attention:  # the explicit softmax, so the probabilities can be returned
            probs = attention_probs(q, k, attn_mask)  # (B, H, N, N)
            out = F.dropout(probs, drop).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))  # (B, N, D)
        return (out, probs) if return_attention else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, *, activation: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (B, N, D) -> (B, N, hidden) -> (B, N, D)


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

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, return_attention: bool = False):
        """(B, N, D) -> (B, N, D); with `return_attention` also the attention probabilities (B, H, N, N)."""
        a = self.attn(self.norm1(x), attn_mask=attn_mask, return_attention=return_attention)
        a, probs = a if return_attention else (a, None)
        x = x + self.drop_path1(self.ls1(a))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, probs) if return_attention else x


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
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, activation=activation)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        """(B, N, D) -> (B, D); with `return_attention` also the query's probabilities (B, H, 1, N)."""
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.heads, self.head_dim).transpose(1, 2)  # (B,H,1,hd)
        k, v = self.kv(x).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        if return_attention:
            probs = attention_probs(q, k)  # (B, H, 1, N)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        out = (out + self.mlp(self.norm(out)))[:, 0]  # (B, D)
        return (out, probs) if return_attention else out


class VisionTransformer(PretrainedMixin, nn.Module):
    model_type = "vitlab_vit"
    config_class = ViTConfig

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        cfg.validate()
        check_model_size(cfg)  # a width of 10^9 fails here in microseconds, not after allocating for a minute
        self.cfg = cfg
        D = cfg.width
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.num_features = D
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg) if cfg.stem == "patchify" else ConvStem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        if cfg.pos_embed == "learned":
            n = cfg.num_patches + (cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, D))
        elif cfg.pos_embed == "sincos2d":  # fixed, so not saved: rebuilt for any grid
            self.register_buffer("pos_embed", sincos_2d(cfg.grid_size, cfg.grid_size, D)[None], persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()

        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth, as timm
        self.blocks = nn.ModuleList(
            Block(D, heads=cfg.heads, mlp_dim=cfg.mlp_dim, qkv_bias=cfg.qkv_bias, drop=cfg.dropout,
                  attn_drop=cfg.attn_dropout, drop_path=dpr[i], layerscale_init=cfg.layerscale_init,
                  norm_eps=cfg.norm_eps, activation=cfg.activation)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()

        self.attn_pool = MAPHead(D, heads=cfg.heads, mlp_dim=cfg.mlp_dim, norm_eps=cfg.norm_eps,
                                 activation=cfg.activation) if cfg.pooling == "map" else None
        self.seq_pool = nn.Linear(D, 1) if cfg.pooling == "seq" else None  # a score per token (CCT)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        if cfg.pre_logits_dim:
            self.pre_logits = nn.Linear(D, cfg.pre_logits_dim)
            self.num_features = cfg.pre_logits_dim
        else:
            self.pre_logits = None
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        # DeiT: the distillation token's own classifier; eval averages the two heads
        self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.distill_token and cfg.num_classes else None
        self.distilled_training = False  # set_distilled_training: training forward returns both heads
        self.init_weights()

    # ---- initialisation (timm's default 'vit' scheme) ---------------------------------------------
    def init_weights(self) -> None:
        def init_linear(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):  # convs keep PyTorch's default, as in timm
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(init_linear)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # as timm's distilled DeiT
        if self.attn_pool is not None:
            s = self.cfg.width**-0.5
            nn.init.trunc_normal_(self.attn_pool.latent, std=s, a=-2 * s, b=2 * s)

    # ---- timm-style API ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (tokens and positions; norms/biases go by ndim)."""
        return {"pos_embed", "cls_token", "dist_token", "reg_token", "attn_pool.latent"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's switch: in training mode, forward returns (class-head logits, distillation-head logits)."""
        self.distilled_training = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    # ---- forward ----------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix positions or None, patch positions (1, h*w, D)) for this grid."""
        if self.pos_embed is None:
            return None, None
        cfg = self.cfg
        if cfg.pos_embed == "sincos2d":
            pe = self.pos_embed if grid == (cfg.grid_size, cfg.grid_size) else \
                sincos_2d(*grid, cfg.width)[None].to(self.pos_embed)
            return None, pe
        n_pre = self.num_prefix_tokens if cfg.pos_embed_prefix else 0
        prefix, patches = self.pos_embed[:, :n_pre], self.pos_embed[:, n_pre:]
        patches = resample_grid(patches, (cfg.grid_size, cfg.grid_size), grid)  # bicubic, as timm
        return (prefix if n_pre else None), patches

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, prefix + N, D) with positions, before the blocks."""
        x, grid = self.patch_embed(x)  # (B, N, D)
        pre_pos, patch_pos = self._pos_embed(grid)
        if patch_pos is not None:
            x = x + patch_pos
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)  # (1, prefix, D)
            if pre_pos is not None:  # added once, before the batch broadcast: the same sums, fewer of them
                pre = pre + pre_pos
            x = torch.cat([pre.expand(x.shape[0], -1, -1), x], dim=1)  # (B, prefix + N, D)
        return self.norm_pre(self.pos_drop(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens after the last block and the final norm, (B, prefix + N, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return self.norm(x)

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_features` that also returns every block's attention probabilities, each (B, H, N, N)."""
        x, attns = self.embed(x), []
        for blk in self.blocks:
            x, probs = blk(x, return_attention=True)
            attns.append(probs)
        return self.norm(x), attns

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, *,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's API: the outputs of chosen blocks (the last `indices` ones, or those listed; all by default).

        Each intermediate is the patch tokens as (B, D, h, w) ("NCHW") or (B, N, D) ("NLC"), with
        `norm` through the final norm; `return_prefix_tokens` pairs each with its (B, prefix, D) tokens
        (when the model has any).
        Returns the list with `intermediates_only`, else (final tokens as `forward_features`, list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise VitlabError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth))
        else:
            take = [i + depth if i < 0 else i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise VitlabError(f"block indices {indices!r} out of range for a {depth}-block model")
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        x = self.embed(x)
        last = max(take) if stop_early else depth - 1
        out = []
        for i, blk in enumerate(self.blocks[:last + 1]):
            x = blk(x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, patches = y[:, :self.num_prefix_tokens], y[:, self.num_prefix_tokens:]  # (B, N, D)
                if output_fmt == "NCHW":
                    patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
                out.append((patches, prefix) if return_prefix_tokens and self.num_prefix_tokens else patches)
        if intermediates_only:
            return out
        return self.norm(x), out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D) by the configured pooling."""
        if self.cfg.pooling == "cls":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if self.cfg.pooling == "gap":
            return patches.mean(dim=1)
        if self.cfg.pooling == "seq":
            weights = self.seq_pool(patches).softmax(dim=1)  # (B, N, 1)
            return (weights * patches).sum(dim=1)
        return self.attn_pool(patches)

    def forward_head(self, x: torch.Tensor, *, pre_logits: bool = False):
        """(B, prefix + N, D) -> logits (B, num_classes); features (B, D) with `pre_logits`."""
        dist = x[:, int(self.cfg.class_token)] if self.dist_token is not None else None  # (B, D)
        x = self.fc_norm(self.pool(x))  # (B, D)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        x = self.head_drop(x)
        if pre_logits:
            return x
        logits = self.head(x)  # (B, num_classes)
        if self.head_dist is None:
            return logits
        dist = self.head_dist(self.head_drop(dist))
        if self.distilled_training and self.training:
            return logits, dist
        return (logits + dist) / 2

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        """(B, C, H, W) -> logits (B, num_classes); with `return_attention` also the per-block probabilities.

        A distilled model in distilled training returns (class-head, distillation-head) logits instead.
        """
        if return_attention:
            feats, attns = self.forward_attention(x)
            return self.forward_head(feats), attns
        return self.forward_head(self.forward_features(x))
