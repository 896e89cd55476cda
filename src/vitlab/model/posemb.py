"""Position embeddings: 2-D sin-cos (MoCo v3 / big_vision) and resampling to another grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(grid_h: int, grid_w: int, dim: int, *, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (grid_h * grid_w, dim), row-major over the patch grid.

    big_vision's `posemb_sincos_2d`: a quarter of the channels each for sin(x), cos(x), sin(y), cos(y).
    """
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                          indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float64) / max(dim // 4 - 1, 1)
    omega = 1.0 / temperature**omega  # (dim/4,)
    x = x.flatten()[:, None] * omega[None]  # (HW, dim/4)
    y = y.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()  # (HW, dim)


def resample_grid(posemb: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, old_h*old_w, D) patch-position table to (1, new_h*new_w, D).

    Same as timm's `resample_abs_pos_embed` (bicubic, antialias, computed in fp32), so converted
    models give timm's outputs at other input sizes.
    """
    if tuple(old) == tuple(new):
        return posemb
    D = posemb.shape[-1]
    grid = posemb.float().reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(posemb.dtype)
