"""Where a ViT looks: attention probabilities, the query that pools them, and attention rollout.

Every function returns tensors (no drawing), so a notebook can use them directly:

    attns = attention_maps(model, x)                      # L x (B, H, N, N)
    R = attention_rollout(attns, num_prefix_tokens=model.num_prefix_tokens)   # (B, N, N)
    heat = rollout_map(R, pooling="cls", num_prefix_tokens=1)                  # (B, N_patches)
"""

from __future__ import annotations

import torch

from vitlab.errors import VitlabError
from vitlab.model.vit import VisionTransformer

HEAD_FUSIONS = ("mean", "max", "min")

# What `rollout_map` shows for each pooling: figures and the report quote these words.
ROLLOUT_CAPTIONS = {
    "cls": "how much each input patch flows into the class token",
    "gap": "how much each input patch flows into the averaged patch tokens (GAP pooling, no class token)",
    "map": "the MAP head's attention over the final tokens (mean over heads), traced back through the "
           "rollout to the input patches",
    "seq": "the sequence-pooling weights over the final tokens, traced back through the rollout to the input "
           "patches",
}
ATTENTION_POOLINGS = ("map", "seq")  # poolings that weight the final patch tokens: `pooling_attention` gives them


@torch.no_grad()
def forward_with_attention(model: VisionTransformer, images: torch.Tensor
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final tokens (B, prefix + N, D), per-layer attention probabilities, each (B, H, N, N)).

    Runs in eval mode (no dropout) and restores the model's mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        feats, attns = model.forward_attention(images.to(model.device))
    finally:
        model.train(was_training)
    return feats, [a.float() for a in attns]


def attention_maps(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block: a list of `depth` tensors (B, heads, N, N), rows sum to 1."""
    return forward_with_attention(model, images)[1]


@torch.no_grad()
def pooling_attention(model: VisionTransformer, feats: torch.Tensor) -> torch.Tensor:
    """The pooling's weights over the final patch tokens, (B, heads, N_patches): the MAP head's attention,
    or sequence pooling's softmax scores (CCT) as one head.

    `feats` are `model.forward_features(x)`; pooling reads only the patch tokens (prefix dropped).
    """
    patches = feats[:, model.num_prefix_tokens:]  # (B, Np, D)
    if model.seq_pool is not None:
        return model.seq_pool(patches).softmax(dim=1).transpose(1, 2).float()  # (B, Np, 1) -> (B, 1, Np)
    if model.attn_pool is None:
        raise VitlabError(f"the model pools with {model.cfg.pooling!r}, which has no weights over the tokens")
    _, probs = model.attn_pool(patches, return_attention=True)
    return probs[:, :, 0].float()  # (B, H, 1, Np) -> (B, H, Np)


def cls_attention(attn: torch.Tensor, *, num_prefix_tokens: int, query: str = "cls") -> torch.Tensor:
    """Attention paid to each patch, (..., N_patches), from one (B, [H,] N, N) attention matrix.

    query "cls": the class token's row (token 0). query "patches": the mean over the patch tokens'
    rows, the natural stand-in for models without a class token (GAP/MAP): it says which patches the
    tokens that get averaged look at. Prefix columns (class, registers) are dropped from the result.
    """
    if query == "cls":
        if num_prefix_tokens < 1:
            raise VitlabError("query 'cls' needs a class token; use query='patches' for models without one")
        rows = attn[..., 0, :]  # (..., N)
    elif query == "patches":
        rows = attn[..., num_prefix_tokens:, :].mean(dim=-2)  # (..., N)
    else:
        raise VitlabError(f"query must be 'cls' or 'patches', got {query!r}")
    return rows[..., num_prefix_tokens:]  # (..., Np)


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N) by mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise VitlabError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def attention_rollout(attns: list[torch.Tensor], *, num_prefix_tokens: int, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), (B, N, N): row i = how output token i mixes the inputs.

    Per layer: fuse heads, add the identity for the residual connection, renormalise rows; then
    multiply the layers, last on the left: R = A_L ... A_2 A_1. `discard_ratio` > 0 zeroes that
    fraction of the weakest attention weights in each row first (a common denoising trick); columns
    of the `num_prefix_tokens` class/register tokens are never discarded.
    """
    if not attns:
        raise VitlabError("attention_rollout needs at least one layer of attention")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitlabError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    rollout = None
    for attn in attns:
        a = fuse_heads(attn.float(), head_fusion)  # (B, N, N)
        if discard_ratio > 0:
            a = _discard_weakest(a, discard_ratio, num_prefix_tokens)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a + eye  # residual: the token keeps itself
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def _discard_weakest(a: torch.Tensor, ratio: float, num_prefix_tokens: int) -> torch.Tensor:
    patches = a[..., num_prefix_tokens:]  # (B, N, Np): only patch columns compete
    k = int(patches.shape[-1] * ratio)
    if k == 0:
        return a
    idx = patches.topk(k, dim=-1, largest=False).indices
    patches = patches.scatter(-1, idx, 0.0)
    return torch.cat([a[..., :num_prefix_tokens], patches], dim=-1)


def rollout_map(rollout: torch.Tensor, *, pooling: str, num_prefix_tokens: int,
                pool_attention: torch.Tensor | None = None) -> torch.Tensor:
    """What the pooled representation draws from each input patch, (B, N_patches); see ROLLOUT_CAPTIONS.

    cls: the class token's row of the rollout. gap: the mean of the patch tokens' rows (those are the
    tokens the head averages). map / seq: the pooling's weights over the final patch tokens, (B, H, Np)
    from `pooling_attention`, mean over heads, times the patch rows of the rollout.
    """
    p = num_prefix_tokens
    if pooling == "cls":
        flow = rollout[:, 0]  # (B, N)
    elif pooling == "gap":
        flow = rollout[:, p:].mean(dim=1)  # (B, N)
    elif pooling in ATTENTION_POOLINGS:
        if pool_attention is None:
            raise VitlabError(f"rollout_map(pooling={pooling!r}) needs pool_attention from pooling_attention()")
        weights = pool_attention.float().mean(dim=1)  # (B, Np)
        flow = (weights[:, None] @ rollout[:, p:])[:, 0]  # (B, 1, Np) @ (B, Np, N) -> (B, N)
    else:
        raise VitlabError(f"pooling must be one of {tuple(ROLLOUT_CAPTIONS)}, got {pooling!r}")
    return flow[:, p:]  # (B, Np)


def to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., gh*gw) -> (..., gh, gw), row-major as the patch embedding flattens them."""
    return values.reshape(*values.shape[:-1], *grid)

