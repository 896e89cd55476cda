"""The Swin Transformer (Liu et al. 2021): a hierarchical ViT with shifted windows, readable top to bottom.

image (B, C, H, W) -> PxP patches (B, H/P, W/P, D) -> stage 0 blocks -> [merge 2x2 patches, stage i blocks]...
-> norm -> average pool -> head -> logits (B, num_classes)

Attention stays inside ws x ws windows, so its cost grows with the number of patches, not its square; every
second block rolls the grid by ws/2 first (a "shifted window", with a mask for the tokens the roll wrapped
around), so information crosses window borders. Each stage after the first merges 2x2 neighbours: half the
grid, twice the channels, a pyramid of feature maps as in a CNN. Tensors stay NHWC between blocks.

Names, shapes and buffers are those of timm 1.0's `SwinTransformer` (`layers.i.downsample` starts stage
i > 0, `relative_position_index` and `attn_mask` are non-persistent buffers), so its state dicts load
unchanged (`vitlab.convert.from_timm`). Other input sizes (multiples of the patch) work as timm's
`dynamic_img_size=True`: the windows stay those of `image_size`, the shifted-window masks are built per call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError, check_fields
from vitlab.model.flops import check_model_size
from vitlab.model.hub import METADATA_KEYS, PretrainedMixin
from vitlab.model.vit import DropPath, Mlp, attention_probs

POOLS = ("avg", "max", "avgmax")  # timm's global_pool names (over the final NHWC map)
MASKED = -100.0  # what timm adds to the scores of token pairs from different regions of a shifted window


@dataclass
class SwinConfig:
    """Everything that shapes a SwinTransformer. Field names follow timm's constructor where one exists."""

    image_size: int = 224
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    embed_dim: int = 96  # channels of stage 0; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: int = 7  # side of the attention window, in patches (clamped to a smaller stage grid)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)
    attn_drop_rate: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last block, linear from 0 over all blocks (timm)
    norm_eps: float = 1e-5
    global_pool: str = "avg"  # avg | max | avgmax
    name: str = field(default="", compare=False)  # variant string it was made from, informative only

    def __post_init__(self) -> None:
        if isinstance(self.depths, (list, tuple)):  # JSON gives lists
            self.depths = tuple(self.depths)
        if isinstance(self.num_heads, (list, tuple)):
            self.num_heads = tuple(self.num_heads)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        """Blocks in all stages."""
        return sum(self.depths)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))

    @property
    def stage_grids(self) -> tuple[int, ...]:
        """Side of each stage's (square) grid: each merge halves it, rounding up (odd grids are padded)."""
        grids = [self.grid_size]
        for _ in range(1, self.num_stages):
            grids.append((grids[-1] + 1) // 2)
        return tuple(grids)

    @property
    def stage_windows(self) -> tuple[tuple[int, int], ...]:
        """(window, shift of the odd blocks) per stage; a grid no larger than the window is one unshifted window."""
        return tuple((g, 0) if g <= self.window_size else (self.window_size, self.window_size // 2)
                     for g in self.stage_grids)

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise VitlabError(f"invalid SwinConfig: {msg}")

        for k in ("image_size", "patch_size", "in_channels", "embed_dim", "window_size"):
            v = getattr(self, k)
            need(isinstance(v, int) and v > 0, f"{k} must be a positive integer, got {v!r}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(len(self.depths) > 0, "depths must name at least one stage")
        need(all(isinstance(d, int) and d > 0 for d in self.depths),
             f"depths must be positive integers, got {self.depths}")
        need(len(self.num_heads) == len(self.depths),
             f"num_heads {self.num_heads} must have one entry per stage of depths {self.depths}")
        need(all(isinstance(h, int) and h > 0 for h in self.num_heads),
             f"num_heads must be positive integers, got {self.num_heads}")
        for i, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            need(dim % heads == 0, f"stage {i} has {dim} channels (embed_dim * 2**{i}), not divisible by its "
                                   f"{heads} heads; change embed_dim or num_heads")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
             f"use an image size that is a multiple of {self.patch_size}")
        need(self.mlp_ratio > 0 and int(self.embed_dim * self.mlp_ratio) > 0,
             f"mlp_ratio must be > 0 (and leave an MLP of at least one unit), got {self.mlp_ratio}")
        for k in ("drop_rate", "attn_drop_rate", "drop_path"):
            need(0.0 <= getattr(self, k) < 1.0, f"{k} must be in [0, 1), got {getattr(self, k)}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.global_pool in POOLS, f"global_pool {self.global_pool!r} unknown; choose one of {POOLS}")

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d, "depths": list(self.depths), "num_heads": list(self.num_heads)}

    @classmethod
    def from_dict(cls, d: dict) -> SwinConfig:
        check_fields(cls, d, "SwinConfig", ignore=METADATA_KEYS)
        return cls(**{k: v for k, v in d.items() if k not in METADATA_KEYS})

    def summary(self, params: int | None = None) -> str:
        """"swin-test 16w 1-1d 1-2h /2 w4 32px (0.01M params)": embed dim, depths, heads, patch, window, size."""
        size = f" ({params / 1e6:.2f}M params)" if params is not None else ""
        depths, heads = "-".join(map(str, self.depths)), "-".join(map(str, self.num_heads))
        return (f"{self.name or 'Swin'} {self.embed_dim}w {depths}d {heads}h /{self.patch_size} "
                f"w{self.window_size} {self.image_size}px{size}")


# ---- variants -------------------------------------------------------------------------------------
_CIFAR = dict(image_size=32, patch_size=2, window_size=4, num_classes=10)
SWIN_VARIANTS: dict[str, dict] = {  # the first three at timm's swin_{tiny,small,base}_patch4_window7_224 sizes
    "swin-tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin-small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin-base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    # grids 16 -> 8 -> 4 (one window), heads of 32: trains at 0.77x conv128's img/s here (bf16 and fp32, batch 128;
    # 48 wide ran at 1.0-1.5x, 96 wide at 0.38x), so it fits the CPU recipes' minutes with 2.7x conv128's params
    "swin-cifar": dict(**_CIFAR, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8)),
    "swin-test": dict(**_CIFAR, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),  # for tests: builds in milliseconds
}


def parse_swin_variant(name: str, **overrides) -> SwinConfig:
    """"swin-cifar" (+ keyword overrides such as num_classes=100) -> its SwinConfig."""
    if name not in SWIN_VARIANTS:
        raise VitlabError(f"unknown Swin variant {name!r}; choose one of {list(SWIN_VARIANTS)}")
    check_fields(SwinConfig, overrides, "SwinConfig")
    kw = {**SWIN_VARIANTS[name], **overrides}
    kw.setdefault("name", name)
    return SwinConfig(**kw)


# ---- patch embedding ------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """PxP patches -> D channels (one strided conv), then a LayerNorm; the grid stays 2-D (NHWC)."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise VitlabError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, D, H/P, W/P) -> (B, H/P, W/P, D)


# ---- windows --------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws, ws, C): non-overlapping windows, row-major over the grid, image-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, ws, ws, C) -> (B, H, W, C): the inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).transpose(2, 3)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(-1, H, W, C)


# ---- relative position bias -----------------------------------------------------------------------
def relative_position_index(ws: int) -> torch.Tensor:
    """(ws^2, ws^2) long: for tokens i, j of a window (row-major), the row of the bias table holding the bias
    for j's offset from i. Offsets (dy, dx) each span 2ws-1 values; row = (dy + ws-1) * (2ws-1) + dx + ws-1."""
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    y, x = yy.flatten(), xx.flatten()  # (N,) each
    dy = y[:, None] - y[None, :] + ws - 1  # (N, N) in [0, 2ws-2]
    dx = x[:, None] - x[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


# ---- shifted-window mask --------------------------------------------------------------------------
def shifted_window_mask(grid_h: int, grid_w: int, ws: int, shift: int, *, device=None) -> torch.Tensor:
    """(nW, ws^2, ws^2) additive mask of a shifted block: 0 within a region, MASKED across regions.

    After the roll by -shift, the last window row (column) holds tokens from both ends of the image; the
    grid is cut at -ws and -shift into three bands per axis, 3x3 regions, and tokens attend only within
    their own region. Built over the grid padded up to a multiple of ws, as timm does (it rolls first,
    then pads, so on a grid ws does not divide the regions are those of the padded grid).
    """
    def bands(n: int) -> torch.Tensor:
        padded = -(-n // ws) * ws
        band = torch.zeros(padded, dtype=torch.long, device=device)
        band[padded - ws:] = 1
        band[padded - shift:] = 2
        return band

    region = (bands(grid_h)[:, None] * 3 + bands(grid_w)[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
    ids = window_partition(region, ws).view(-1, ws * ws)  # (nW, N)
    return (ids[:, :, None] != ids[:, None, :]).float() * MASKED  # (nW, N, N)


# ---- window attention -----------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per head and relative offset."""

    def __init__(self, dim: int, *, heads: int, window: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_bias(self, mask: torch.Tensor | None, windows: int) -> torch.Tensor:
        """What is added to the scores: the table looked up at every token pair's offset, (1, heads, N, N),
        plus for shifted windows `mask` (nW, N, N), then (windows, heads, N, N) for all B * nW windows."""
        N = self.window**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        bias = bias.view(N, N, self.heads).permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        if mask is None:
            return bias
        nW = mask.shape[0]  # windows are image-major: window w of every image gets mask[w]
        bias = bias + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, N)
        return bias.unsqueeze(0).expand(windows // nW, -1, -1, -1, -1).reshape(windows, self.heads, N, N)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_attention: bool = False):
        """(B * nW, N, C) windows -> (B * nW, N, C); `mask` (nW, N, N) for shifted windows.

        With `return_attention` also the probabilities (B * nW, heads, N, N).
        """
        BW, N, C = x.shape
        q, k, v = self.qkv(x).view(BW, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (BW, h, N, hd)
        bias = self.attention_bias(mask, BW)
        drop = self.attn_drop if self.training else 0.0
        if return_attention:  # the explicit softmax, so the probabilities can be returned
            probs = attention_probs(q, k, bias)  # (BW, h, N, N)
            out = F.dropout(probs, drop).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(BW, N, C)))  # (BW, N, C)
        return (out, probs) if return_attention else out


# ---- block ----------------------------------------------------------------------------------------
class SwinBlock(nn.Module):
    """Pre-norm block: x + (shifted) window attention(norm(x)), then x + mlp(norm(x)); NHWC in and out.

    `window` / `shift` are the effective ones (SwinConfig.stage_windows): a grid no larger than the window
    is one window, never shifted, as in timm.
    """

    def __init__(self, dim: int, *, grid: int, window: int, shift: int, heads: int, mlp_ratio: float,
                 qkv_bias: bool = True, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.grid, self.window, self.shift, self.heads = grid, window, shift, heads
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, heads=heads, window=window, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mask = shifted_window_mask(grid, grid, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def window_attention(self, x: torch.Tensor, *, return_attention: bool = False):
        """(B, H, W, C) -> (B, H, W, C): roll, pad, cut into windows, attend, and undo all three."""
        B, H, W, C = x.shape
        ws, s = self.window, self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))  # the window grid moves by +s
        ph, pw = -H % ws, -W % ws  # zero tokens up to a multiple of the window (after the roll, as timm)
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        windows = window_partition(x, ws).view(-1, ws * ws, C)  # (B * nW, N, C)
        mask = self.attn_mask
        if s and (H, W) != (self.grid, self.grid):  # another input size: its own mask, as timm's dynamic size
            mask = shifted_window_mask(H, W, ws, s, device=x.device)
        out = self.attn(windows, mask=mask, return_attention=return_attention)
        out, probs = out if return_attention else (out, None)
        x = window_reverse(out.view(-1, ws, ws, C), ws, Hp, Wp)[:, :H, :W]  # (B, H, W, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if return_attention:
            return x, probs.view(B, -1, self.heads, ws * ws, ws * ws)  # (B, nW, h, N, N)
        return x

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        """(B, H, W, C) -> (B, H, W, C); with `return_attention` also (B, nW, heads, N, N) probabilities."""
        B, H, W, C = x.shape
        a = self.window_attention(self.norm1(x), return_attention=return_attention)
        a, probs = a if return_attention else (a, None)
        x = (x + self.drop_path1(a)).reshape(B, H * W, C)  # tokens as a sequence, the ViT Mlp's (B, N, C)
        x = (x + self.drop_path2(self.mlp(self.norm2(x)))).reshape(B, H, W, C)
        return (x, probs) if return_attention else x


# ---- patch merging and the stage ------------------------------------------------------------------
class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: concat their channels (4C), LayerNorm, Linear to `out_dim` (2C, no bias)."""

    def __init__(self, dim: int, out_dim: int, *, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim); an odd side gets a row (column) of zeros."""
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # channel order of the original Swin (and timm): top-left, bottom-left, top-right, bottom-right
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 4C) -> (B, H/2, W/2, out_dim)


class SwinStage(nn.Module):
    """[patch merging (stages after the first)] -> depth blocks, alternately plain and shifted windows."""

    def __init__(self, cfg: SwinConfig, i: int, drop_paths: list[float]) -> None:
        super().__init__()
        dim, grid = cfg.stage_dims[i], cfg.stage_grids[i]
        window, shift = cfg.stage_windows[i]
        self.downsample = PatchMerging(cfg.stage_dims[i - 1], dim, norm_eps=cfg.norm_eps) if i else nn.Identity()
        self.blocks = nn.Sequential(*(
            SwinBlock(dim, grid=grid, window=window, shift=shift if j % 2 else 0, heads=cfg.num_heads[i],
                      mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
                      drop_path=drop_paths[j], norm_eps=cfg.norm_eps)
            for j in range(cfg.depths[i])))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C_prev) -> (B, H/2, W/2, C)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return x


# ---- pooling and head -----------------------------------------------------------------------------
class ClassifierHead(nn.Module):
    """Global pool over the final (B, H, W, C) map -> dropout -> `fc` (timm's `head.fc`)."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.pool_type = cfg.global_pool
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C)."""
        if self.pool_type == "avg":
            return x.mean(dim=(1, 2))
        if self.pool_type == "max":
            return x.amax(dim=(1, 2))
        return 0.5 * x.mean(dim=(1, 2)) + 0.5 * x.amax(dim=(1, 2))

    def forward(self, x: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x))  # (B, C)
        return x if pre_logits else self.fc(x)  # (B, num_classes)


# ---- the model ------------------------------------------------------------------------------------
class SwinTransformer(PretrainedMixin, nn.Module):
    model_type = "vitlab_swin"
    config_class = SwinConfig

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        cfg.validate()
        check_model_size(cfg)  # an absurd size fails here in microseconds, not after allocating for a minute
        self.cfg = cfg
        self.num_features = cfg.num_features
        self.patch_embed = PatchEmbed(cfg)
        total = cfg.depth
        rates = [cfg.drop_path * b / max(total - 1, 1) for b in range(total)]  # grows over all blocks, as timm
        starts = [sum(cfg.depths[:i]) for i in range(cfg.num_stages)]
        self.layers = nn.Sequential(*(SwinStage(cfg, i, rates[s:s + d])
                                      for i, (s, d) in enumerate(zip(starts, cfg.depths))))
        self.norm = nn.LayerNorm(cfg.num_features, eps=cfg.norm_eps)
        self.head = ClassifierHead(cfg)
        self.init_weights()

    # ---- initialisation (timm's default) --------------------------------------------------------
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):  # convs and norms keep PyTorch's default, as in timm
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # ---- timm-style API ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay: every relative position bias table (as timm)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def block_layout(self) -> list[dict]:
        """One dict per block, in forward order: stage, block, grid (H, W), window, shift, heads."""
        return [{"stage": i, "block": j, "grid": (b.grid, b.grid), "window": b.window, "shift": b.shift,
                 "heads": b.heads}
                for i, stage in enumerate(self.layers) for j, b in enumerate(stage.blocks)]

    # ---- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last stage after the final norm, (B, H', W', C') NHWC as timm."""
        x = self.patch_embed(x)  # (B, H/P, W/P, D)
        x = self.layers(x)  # (B, H/P/2^(S-1), W/P/2^(S-1), D * 2^(S-1))
        return self.norm(x)

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, attns): attns over all blocks in order, each (B, nW, heads, N, N), N = window^2: the
        softmax of that block's windows (after its shift), windows row-major over the (rolled) grid."""
        x, attns = self.patch_embed(x), []
        for stage in self.layers:
            x = stage.downsample(x)
            for blk in stage.blocks:
                x, probs = blk(x, return_attention=True)
                attns.append(probs)
        return self.forward_head(self.norm(x)), attns

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's API: the output of chosen stages (the last `indices` ones, or those listed; all by default).

        Each is (B, C_i, H_i, W_i) ("NCHW") or (B, H_i, W_i, C_i) ("NHWC"); `norm` puts the last stage
        through the final norm (the only stage it is sized for). Returns the list with `intermediates_only`,
        else (the final map as `forward_features` when the last stage ran, else that stage's output; the list).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise VitlabError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.layers)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n)) if 0 < indices <= n else [n]  # [n]: refused below
        else:
            take = [i + n if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < n for i in take):
            raise VitlabError(f"stage indices {indices!r} out of range for a {n}-stage model")
        last = max(take) if stop_early else n - 1
        x, out = self.patch_embed(x), []
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                out.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        return (self.norm(x) if last == n - 1 else x), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) -> logits (B, num_classes); pooled features (B, C) with `pre_logits`."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        """(B, C, H, W) -> logits (B, num_classes); with `return_attention` also the per-block probabilities."""
        if return_attention:
            return self.forward_attention(x)
        return self.forward_head(self.forward_features(x))
