"""Patch-embedding filters (ViT paper, Fig. 7 left): the principal components of the patch projection.

The projection is a (D, C, P, P) conv weight: D filters that each look at one P x P RGB patch. Their
first principal components show what the model measures in a patch (colour, edges, textures), much
like the first layer of a CNN.
"""

from __future__ import annotations

import torch

from vitlab.inspect.pca import PCA, pca
from vitlab.model.vit import VisionTransformer


def patch_filter_pca(model: VisionTransformer, *, k: int = 28) -> PCA:
    """PCA of the D patch filters flattened to C*P*P features; at most min(D, C*P*P) components."""
    w = model.patch_embed.proj.weight.detach()  # (D, C, P, P)
    return pca(w.flatten(1), k=k)  # components (k, C*P*P)


def patch_filter_components(model: VisionTransformer, k: int = 28) -> torch.Tensor:
    """The first k principal components of the patch filters as images, (k, C, P, P)."""
    _, C, P, Q = model.patch_embed.proj.weight.shape
    comps = patch_filter_pca(model, k=k).components
    return comps.reshape(-1, C, P, Q)  # (k, C, P, P)


def stem_kernels(model: VisionTransformer, *, k: int = 28) -> torch.Tensor:
    """The conv stem's first 3x3 kernels, the ones that see the pixels, strongest (L2 norm) first: (k, C, 3, 3)."""
    w = model.patch_embed.convs[0].weight.detach()  # (C1, C, 3, 3)
    order = w.flatten(1).norm(dim=1).argsort(descending=True)
    return w[order[:k]]
