"""Principal component analysis by SVD, shared by the filter and embedding views."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitlab.errors import VitlabError


class PCA(NamedTuple):
    components: torch.Tensor  # (k, F), orthonormal rows, strongest first
    explained_variance: torch.Tensor  # (k,), decreasing
    explained_variance_ratio: torch.Tensor  # (k,), fraction of the total variance
    mean: torch.Tensor  # (F,)


def pca(x: torch.Tensor, *, k: int) -> PCA:
    """Top-k principal components of the rows of `x` (n samples, F features).

    Signs are fixed so that each component's largest-magnitude entry is positive: SVD leaves them
    arbitrary, and a flipped sign would invert the colours of a filter picture from run to run.
    """
    x = torch.as_tensor(x).detach().double().cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise VitlabError(f"pca needs a (samples >= 2, features) matrix, got shape {tuple(x.shape)}")
    k = min(k, *x.shape)
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh: (min(n, F), F)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))  # (k, 1)
    comps = comps * torch.where(signs == 0, 1.0, signs)
    var = s**2 / (x.shape[0] - 1)
    total = var.sum().clamp_min(torch.finfo(var.dtype).tiny)
    return PCA(comps.float(), var[:k].float(), (var[:k] / total).float(), mean.float())


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(n, F) -> (n, 2): coordinates on the first two principal components."""
    p = pca(x, k=2)
    coords = (torch.as_tensor(x).detach().float().cpu() - p.mean) @ p.components.T  # (n, k)
    if coords.shape[1] < 2:  # a single feature: pad so callers can always plot two axes
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1])], dim=1)
    return coords
