"""Position-embedding similarity (ViT paper, Fig. 7 centre): did the model learn the 2-D layout?

Tile (r, c) of the figure is the cosine similarity between the embedding of patch position (r, c) and
every other position; learned embeddings that bump up around their own row and column have
discovered the image's 2-D structure on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError
from vitlab.model.vit import VisionTransformer


def patch_position_embedding(model: VisionTransformer) -> torch.Tensor | None:
    """The position embedding of the patch grid, (N_patches, D), or None when the model has none.

    Learned tables that also cover class/register tokens (`pos_embed_prefix`) lose those rows first;
    sin-cos tables are fixed and cover only the patches.
    """
    cfg = model.cfg
    if model.pos_embed is None:
        return None
    pe = model.pos_embed.detach()[0].float().cpu()  # (n, D)
    if cfg.pos_embed == "learned" and cfg.pos_embed_prefix:
        pe = pe[model.num_prefix_tokens:]
    return pe  # (Np, D)


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, n) cosine similarity of every pair of rows."""
    x = F.normalize(x.double(), dim=-1)
    return (x @ x.T).float()


def position_similarity(model: VisionTransformer) -> torch.Tensor:
    """(N_patches, N_patches) cosine similarity of the patch position embeddings."""
    pe = patch_position_embedding(model)
    if pe is None:
        raise VitlabError("the model has no position embedding (pos_embed='none'): nothing to compare")
    return cosine_similarity_matrix(pe)
