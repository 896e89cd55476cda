"""Cost model of a ViT: FLOPs per image (for MFU) and a training activation-memory estimate."""

from __future__ import annotations

from vitlab.model.config import ViTConfig


def flops_per_image(cfg: ViTConfig, *, image_size: int | None = None, training: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image's forward pass; x3 for training (fwd + bwd).

    Counts the patch projection, qkv/proj/MLP linears, QK^T and AV, the MAP head and the classifier;
    norms, softmax and activations are a few percent and left out, as in nanoGPT's estimate_mfu.
    """
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


def stem_macs(cfg: ViTConfig, image_size: int | None = None) -> int:
    """Multiply-adds of the stem: the patchify conv, or the conv stem's 3x3 convs and its 1x1 projection."""
    size = image_size or cfg.image_size
    if cfg.stem == "patchify":
        return (size // cfg.patch_size) ** 2 * cfg.width * cfg.in_channels * cfg.patch_size**2
    macs, c_in = 0, cfg.in_channels
    for c_out in cfg.conv_stem_channels:  # each 3x3 conv runs at the resolution before its pooling halves it
        macs += size * size * 9 * c_in * c_out
        size, c_in = (size + 1) // 2, c_out
    return macs + size * size * c_in * cfg.width


def activation_bytes_per_image(cfg: ViTConfig, *, bytes_per_value: int = 4, fused_attention: bool = True) -> int:
    """Rough memory autograd keeps per image for training (no gradient checkpointing).

    Per block, the saved inputs of: two LayerNorms, qkv (3ND), attention output, proj, fc1 input,
    fc1 output and activation output (2NM), residuals; plus the (H, N, N) probabilities when
    attention is not fused. An estimate to size batches, not an exact count.
    """
    N = cfg.num_tokens
    D, M, L, H = cfg.width, cfg.mlp_dim, cfg.depth, cfg.heads
    per_block = N * (9 * D + 2 * M) + (0 if fused_attention else 2 * H * N * N)
    return bytes_per_value * (L * per_block + N * D * 3)


def estimate_mfu(cfg: ViTConfig, images_per_second: float, peak_flops: float, *, training: bool = True) -> float:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the chip's peak (nanoGPT's estimate_mfu)."""
    return flops_per_image(cfg, training=training) * images_per_second / peak_flops
