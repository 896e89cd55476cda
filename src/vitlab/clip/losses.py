"""Contrastive image-text losses on L2-normalised embeddings.

CLIP (Radford et al. 2021): softmax cross-entropy over the batch, both directions, averaged.
SigLIP (Zhai et al. 2023): every (image, text) pair is a binary problem, labels 2I - 1:
    loss = -sum_ij log sigmoid(label_ij * (exp(t) cos_ij + b)) / B      (summed over pairs, mean over images)
`logit_scale` is always the log of the multiplier (t); the multiplier itself is exp(t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError

MAX_CLIP_SCALE = 100.0  # CLIP clamps exp(t) so the temperature cannot collapse (Radford et al. 2021)


def clip_scale(logit_scale: torch.Tensor | float) -> torch.Tensor:
    """exp(logit_scale) clamped at 100, CLIP's multiplier of the cosine similarities."""
    return torch.as_tensor(logit_scale).exp().clamp(max=MAX_CLIP_SCALE)


def _check_pair(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise VitlabError(f"image and text embeddings must both be (B, E) with the same shape, got "
                          f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
              ) -> torch.Tensor:
    """Symmetric InfoNCE: row i of the image-text similarity matrix must pick text i, and vice versa."""
    _check_pair(image_embeds, text_embeds)
    logits = clip_scale(logit_scale) * image_embeds @ text_embeds.T  # (B, B) images x texts
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_pair_loss_sum(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                         logit_bias: torch.Tensor, *, positive_offset: int | None = 0) -> torch.Tensor:
    """-sum log sigmoid(label * logit) over all pairs of these images and texts (no division).

    Pair (i, j) is positive when j == i - positive_offset, i.e. text j of this block belongs to image i;
    positive_offset None means the block holds negatives only (texts from another chunk or rank).
    """
    logits = image_embeds @ text_embeds.T * logit_scale.exp() + logit_bias  # (Bi, Bt)
    labels = -torch.ones_like(logits)
    if positive_offset is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        cols = rows - positive_offset
        ok = (cols >= 0) & (cols < logits.shape[1])
        labels[rows[ok], cols[ok]] = 1.0
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    """Pairwise sigmoid loss over the whole B x B matrix (as big_vision: summed over pairs, / B)."""
    _check_pair(image_embeds, text_embeds)
    scale, bias = torch.as_tensor(logit_scale), torch.as_tensor(logit_bias)
    return siglip_pair_loss_sum(image_embeds, text_embeds, scale, bias) / image_embeds.shape[0]


def siglip_loss_chunked(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                        logit_bias: torch.Tensor | float, *, chunk_size: int) -> torch.Tensor:
    """`siglip_loss` computed over blocks of `chunk_size` texts: peak memory B x chunk_size, never B x B.

    Each block runs under activation checkpointing, so backward recomputes its B x chunk logits instead of
    keeping them: values and gradients are those of the dense loss.
    """
    _check_pair(image_embeds, text_embeds)
    if chunk_size < 1:
        raise VitlabError(f"chunk_size must be >= 1, got {chunk_size}")
    scale, bias = torch.as_tensor(logit_scale), torch.as_tensor(logit_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_embeds, text_embeds, scale, bias))
    total = image_embeds.new_zeros(())
    for start in range(0, text_embeds.shape[0], chunk_size):
        texts = text_embeds[start:start + chunk_size]  # (c, E)
        if needs_grad:
            part = checkpoint(siglip_pair_loss_sum, image_embeds, texts, scale, bias, positive_offset=start,
                              use_reentrant=False)
        else:
            part = siglip_pair_loss_sum(image_embeds, texts, scale, bias, positive_offset=start)
        total = total + part
    return total / image_embeds.shape[0]
