"""Cost model of a ViT or a Swin: FLOPs per image (for MFU), activation memory, and a size check run before
building. Each function takes a ViTConfig or a SwinConfig."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig

if TYPE_CHECKING:  # model/swin.py imports this module; the check below reads the config by its fields
    from vitlab.model.swin import SwinConfig


def is_swin(cfg) -> bool:
    return hasattr(cfg, "depths")


def swin_stages(cfg: SwinConfig, image_size: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """Per stage (channels, channels before it (0: none), grid side, window side, MLP hidden) at `image_size`."""
    grid, prev = (image_size or cfg.image_size) // cfg.patch_size, 0
    for i, dim in enumerate(cfg.stage_dims):
        if i:
            grid = (grid + 1) // 2  # patch merging pads an odd side
        yield dim, prev, grid, min(grid, cfg.window_size), int(dim * cfg.mlp_ratio)
        prev = dim


def swin_macs(cfg: SwinConfig, image_size: int | None = None) -> int:
    """Multiply-adds of a Swin forward: patch conv, merging, qkv/proj (over the window-padded grid), the
    attention inside each window, MLP, head."""
    size = image_size or cfg.image_size
    macs = (size // cfg.patch_size) ** 2 * cfg.embed_dim * cfg.in_channels * cfg.patch_size**2
    for (C, prev, g, ws, M), depth in zip(swin_stages(cfg, size), cfg.depths):
        if prev:
            macs += g * g * 4 * prev * C
        padded = (-(-g // ws) * ws) ** 2  # tokens the attention sees, zero padding included
        macs += depth * (padded * 4 * C * C + 2 * padded * ws * ws * C + 2 * g * g * C * M)
    return macs + cfg.num_features * cfg.num_classes


def flops_per_image(cfg: ViTConfig | SwinConfig, *, image_size: int | None = None, training: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image's forward pass; x3 for training (fwd + bwd).

    Counts the patch projection, qkv/proj/MLP linears, QK^T and AV, the MAP head and the classifier;
    norms, softmax and activations are a few percent and left out, as in nanoGPT's estimate_mfu.
    """
    if is_swin(cfg):
        return 2 * swin_macs(cfg, image_size) * (3 if training else 1)
    size = image_size or cfg.image_size
    n = (size // cfg.patch_size) ** 2
    N = n + cfg.num_prefix_tokens
    D, M, L = cfg.width, cfg.mlp_dim, cfg.depth
    macs = stem_macs(cfg, size)
    per_block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * M  # qkv, QK^T + AV, proj, MLP
    macs += L * per_block
    if cfg.pooling == "map":
        macs += D * D + n * D * 2 * D + 2 * n * D + D * D + 2 * D * M
    if cfg.pre_logits_dim:
        macs += D * cfg.pre_logits_dim
    if cfg.pooling == "seq":
        macs += n * D
    macs += (cfg.pre_logits_dim or D) * cfg.num_classes + (D * cfg.num_classes if cfg.distill_token else 0)
    return 2 * macs * (3 if training else 1)


def stem_macs(cfg: ViTConfig | SwinConfig, image_size: int | None = None) -> int:
    """Multiply-adds of the stem: the patchify conv, or the conv stem's 3x3 convs and its 1x1 projection."""
    size = image_size or cfg.image_size
    if is_swin(cfg):
        return (size // cfg.patch_size) ** 2 * cfg.embed_dim * cfg.in_channels * cfg.patch_size**2
    if cfg.stem == "patchify":
        return (size // cfg.patch_size) ** 2 * cfg.width * cfg.in_channels * cfg.patch_size**2
    macs, c_in = 0, cfg.in_channels
    for c_out in cfg.conv_stem_channels:  # each 3x3 conv runs at the resolution before its pooling halves it
        macs += size * size * 9 * c_in * c_out
        size, c_in = (size + 1) // 2, c_out
    return macs + size * size * c_in * cfg.width


def activation_bytes_per_image(cfg: ViTConfig | SwinConfig, *, bytes_per_value: int = 4,
                               fused_attention: bool = True) -> int:
    """Rough memory autograd keeps per image for training (no gradient checkpointing).

    Per block, the saved inputs of: two LayerNorms, qkv (3ND), attention output, proj, fc1 input,
    fc1 output and activation output (2NM), residuals; plus the (H, N, N) probabilities when
    attention is not fused (a Swin's: per window). An estimate to size batches, not an exact count.
    """
    if is_swin(cfg):
        n = (cfg.image_size // cfg.patch_size) ** 2 * cfg.embed_dim * 3  # patch embedding and its norm
        for (C, prev, g, ws, M), depth, heads in zip(swin_stages(cfg), cfg.depths, cfg.num_heads):
            n += g * g * 8 * prev  # patch merging: its norm's and its linear's inputs (4 * prev each)
            padded = (-(-g // ws) * ws) ** 2
            n += depth * (g * g * (9 * C + 2 * M) + (0 if fused_attention else 2 * heads * padded * ws * ws))
        return bytes_per_value * n
    N = cfg.num_tokens
    D, M, L, H = cfg.width, cfg.mlp_dim, cfg.depth, cfg.heads
    per_block = N * (9 * D + 2 * M) + (0 if fused_attention else 2 * H * N * N)
    return bytes_per_value * (L * per_block + N * D * 3)


def estimate_mfu(cfg: ViTConfig | SwinConfig, images_per_second: float, peak_flops: float, *,
                 training: bool = True) -> float:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the chip's peak (nanoGPT's estimate_mfu)."""
    return flops_per_image(cfg, training=training) * images_per_second / peak_flops


# ---- size check before building -------------------------------------------------------------------------
MAX_PARAMS = 10**12  # past any ViT ever trained (ViT-22B has 2.2e10): larger is a typo, not a model
MAX_DEPTH = 10_000  # the deepest transformers trained have ~1000 layers; 10^6 blocks take minutes just to build
MEMORY_ENV = "VITLAB_MEMORY_LIMIT"  # bytes (suffix K/M/G/T allowed) the size check compares with; "off": no check


def estimate_params(cfg: ViTConfig | SwinConfig) -> int:
    """Parameter count from the config alone (no tensors): the encoder, embeddings and heads, exact for the
    patchify stem and for a Swin; a conv stem is counted as a patchify one (its 3x3 convs are a rounding error
    in size)."""
    if is_swin(cfg):
        E = cfg.embed_dim
        n = cfg.in_channels * cfg.patch_size**2 * E + 3 * E  # patch conv with bias, its LayerNorm
        for (C, prev, _, ws, M), depth, heads in zip(swin_stages(cfg), cfg.depths, cfg.num_heads):
            n += 8 * prev + 4 * prev * C  # merging: LayerNorm(4 prev), Linear(4 prev -> C) without bias
            qkv_bias = 3 * C if cfg.qkv_bias else 0
            n += depth * (4 * C * C + qkv_bias + C + (2 * ws - 1) ** 2 * heads + 2 * C * M + M + C + 4 * C)
        return n + 2 * cfg.num_features + (cfg.num_features + 1) * cfg.num_classes
    D, M, L, N = cfg.width, cfg.mlp_dim, cfg.depth, cfg.num_patches
    block = 4 * D * D + 2 * D * M + M + 9 * D  # qkv + proj + fc1 + fc2, their biases, two LayerNorms
    n = L * block + cfg.in_channels * cfg.patch_size**2 * D + D  # patch projection
    if cfg.pos_embed == "learned":
        n += (N + (cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0)) * D
    n += cfg.num_prefix_tokens * D + 4 * D  # class/register tokens, pre- and final norms (upper bound)
    if cfg.pooling == "map":
        n += 4 * D * D + 2 * D * M + M + 7 * D
    features = cfg.pre_logits_dim or D
    if cfg.pre_logits_dim:
        n += D * cfg.pre_logits_dim + cfg.pre_logits_dim
    return n + (features + 1) * cfg.num_classes


def model_bytes(cfg: ViTConfig | SwinConfig, *, batch_size: int = 0, training: bool = False,
                bytes_per_value: int = 4) -> int:
    """Memory a model needs: its weights, x4 when training with AdamW (weights, gradients, two moments),
    plus `batch_size` images of activations (the training estimate, which bounds inference's too)."""
    weights = estimate_params(cfg) * bytes_per_value * (4 if training else 1)
    return weights + batch_size * activation_bytes_per_image(cfg, bytes_per_value=bytes_per_value)


def available_memory() -> int | None:
    """Bytes this process may still allocate: $VITLAB_MEMORY_LIMIT if set, else the smaller of MemAvailable
    (/proc/meminfo) and the cgroup's (container's) headroom; None when unknown or when the check is off."""
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        if env.lower() in ("off", "none", "0"):
            return None
        return parse_bytes(env, MEMORY_ENV)
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:  # cgroup v2: a container's limit is often far below the host's free memory
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def parse_bytes(text: str, what: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise VitlabError(f"{what}={text!r}: expected a size such as 8G, 512M or a number of bytes, or 'off'") from None
    return int(value)


def check_model_size(cfg: ViTConfig | SwinConfig, *, batch_size: int = 0, training: bool = False,
                     available: int | None = None) -> int:
    """Refuse a config that cannot be built, before any tensor exists; returns the estimated bytes.

    Always: more than MAX_PARAMS parameters or MAX_DEPTH blocks. Then, unless the default device is
    "meta" (shapes only, as `vitlab info` builds): more memory than is available (`available`, else
    `available_memory()`). Only integer arithmetic on the config: it takes microseconds, allocates nothing.
    """
    params = estimate_params(cfg)
    name = cfg.summary()
    if params > MAX_PARAMS or cfg.depth > MAX_DEPTH:
        raise VitlabError(f"model {name} is not buildable: ~{params:.3g} parameters and depth {cfg.depth} "
                          f"(limits: {MAX_PARAMS:.0e} parameters, depth {MAX_DEPTH}); check width/depth/image_size")
    need = model_bytes(cfg, batch_size=batch_size, training=training)
    if torch.get_default_device().type == "meta":
        return need
    have = available if available is not None else available_memory()
    if have is not None and need > have:
        what = f"{'training' if training else 'weights'}" + (f" at batch {batch_size}" if batch_size else "")
        raise VitlabError(f"model {name} needs ~{format_bytes(need)} ({what}, {params:,} parameters in fp32) but "
                          f"~{format_bytes(have)} of memory is available; set {MEMORY_ENV} to override")
    return need


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"
