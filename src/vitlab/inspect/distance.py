"""Mean attention distance (ViT paper, Fig. 7 right): how far, in pixels, each head looks.

For a head, each query patch's distance is sum_k attention(q, k) * |centre(q) - centre(k)|, summed over
the key patches; averaging over query patches and images gives one number per (layer, head). Small
values mean local heads (like convolutions), large values heads that mix the whole image.
"""

from __future__ import annotations

import torch

from vitlab.errors import VitlabError


def _grid_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def patch_distances(grid: int | tuple[int, int], patch_size: int) -> torch.Tensor:
    """Pixel distance between the centres of every pair of patches, (N_patches, N_patches), row-major."""
    gh, gw = _grid_hw(grid)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # (Np, 2) in patch units
    return (torch.cdist(centres, centres) * patch_size).float()  # (Np, Np) pixels


def mean_attention_distance(attns: list[torch.Tensor], *, grid: int | tuple[int, int], patch_size: int,
                            num_prefix_tokens: int) -> torch.Tensor:
    """(depth, heads) mean attention distance in pixels from per-layer attentions (B, H, N, N).

    Only the patch-to-patch block counts: attention paid to class/register tokens has no position, so it
    contributes nothing (as in the reference computation behind the ViT paper's figure).
    """
    if not attns:
        raise VitlabError("mean_attention_distance needs at least one layer of attention")
    p = num_prefix_tokens
    dist = patch_distances(grid, patch_size).to(attns[0].device)  # (Np, Np)
    n = attns[0].shape[-1] - p
    if dist.shape[0] != n:
        raise VitlabError(f"grid {_grid_hw(grid)} has {dist.shape[0]} patches but the attention has {n} "
                          f"patch tokens (N={attns[0].shape[-1]}, num_prefix_tokens={p})")
    out = []
    for attn in attns:
        a = attn[:, :, p:, p:].float()  # (B, H, Np, Np)
        per_query = (a * dist).sum(dim=-1)  # (B, H, Np)
        out.append(per_query.mean(dim=(0, 2)))  # (H,)
    return torch.stack(out).cpu()  # (L, H)
