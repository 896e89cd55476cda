"""Swin's windows as tensors: which patch sits in which window of a block, the regions the cyclic shift joins and
the mask that keeps them apart, one window's attention laid back on the patch grid, attention distance per block
and the per-stage feature maps as colour images. The figures are drawn by `vitlab.inspect.window_plots`.

A block with shift s rolls its H x W patch grid by (-s, -s), pads it to a multiple of the window ws and cuts it
into ws x ws windows, row-major (`vitlab.model.swin`). In the image, its windows therefore start s patches in, and
the last window row and column hold the strips the roll carried over from the opposite edge: patches that are
not neighbours, which the mask stops from attending to each other. Everything here is in patches of the block's
stage (stage i: patch_size * 2**i pixels).

    layout = model.block_layout()                        # per block: stage, block, grid, window, shift, heads
    _, attns = model.forward_attention(x)                # per block (B, nW, heads, N, N), N = window**2
    ids = window_ids(layout[1]["grid"], layout[1]["window"], layout[1]["shift"])   # (H, W) window of each patch
    dist = window_attention_distance(attns, layout, patch_size=model.cfg.patch_size)  # per block (heads,) px
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError
from vitlab.inspect.distance import _grid_hw, patch_distances
from vitlab.inspect.pca import pca
from vitlab.model.swin import SwinTransformer

PAD = -1  # a window slot holding one of the zero tokens the block adds to make its grid a multiple of the window
# one colour per window that wraps around the image edges, in the figures and the demo alike
WRAP_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#17becf")


def is_swin(model) -> bool:
    """A hierarchical Swin model (windowed attention) rather than a ViT (global attention over one token grid)."""
    return isinstance(model, SwinTransformer)


def _partition(grid2d: torch.Tensor, window: int) -> torch.Tensor:
    """(Hp, Wp) -> (nW, window**2): windows row-major over the grid, slots row-major in each (window_partition)."""
    Hp, Wp = grid2d.shape
    return grid2d.view(Hp // window, window, Wp // window, window).transpose(1, 2).reshape(-1, window * window)


def window_members(grid, window: int, shift: int = 0) -> torch.Tensor:
    """(nW, window**2) long: the patch (row-major index over the stage grid) in each slot of each window of a
    block, in the model's order of windows and slots; PAD where the block pads its grid to a multiple of the window."""
    H, W = _grid_hw(grid)
    idx = torch.arange(H * W).view(H, W)
    if shift:
        idx = torch.roll(idx, shifts=(-shift, -shift), dims=(0, 1))  # as the block rolls its tokens
    idx = F.pad(idx, (0, -W % window, 0, -H % window), value=PAD)  # the block pads after the roll
    return _partition(idx, window)


def window_ids(grid, window: int, shift: int = 0) -> torch.Tensor:
    """(H, W) long: the window (numbered in the block's order) that each patch of the stage grid falls in."""
    H, W = _grid_hw(grid)
    members = window_members(grid, window, shift)
    keep = members != PAD
    ids = torch.empty(H * W, dtype=torch.long)
    ids[members[keep]] = torch.arange(len(members))[:, None].expand_as(members)[keep]
    return ids.view(H, W)


def region_grid(grid, window: int, shift: int = 0) -> torch.Tensor:
    """(Hp, Wp) long over the rolled (and padded) grid: the region 0..8 of each position as the block's mask sees
    them, the grid cut at -window and -shift along each axis (so the strips the roll carried over from the opposite
    edge are regions of their own). All region 0 without a shift."""
    H, W = _grid_hw(grid)

    def bands(n: int) -> torch.Tensor:  # 0: the bulk, 1: the last window row before the strip, 2: the rolled strip
        b = torch.zeros(n, dtype=torch.long)
        if shift:
            b[n - window:] = 1
            b[n - shift:] = 2
        return b

    return bands(H + -H % window)[:, None] * 3 + bands(W + -W % window)[None, :]


def window_regions(grid, window: int, shift: int = 0) -> torch.Tensor:
    """(nW, window**2) long: the region (`region_grid`) of each slot of each window."""
    return _partition(region_grid(grid, window, shift), window)


def window_mask(grid, window: int, shift: int = 0) -> torch.Tensor:
    """(nW, N, N) bool: True where query slot i of a window may attend to key slot j (both of one region)."""
    r = window_regions(grid, window, shift)
    return r[:, :, None] == r[:, None, :]


def wrapped_windows(grid, window: int, shift: int) -> list[int]:
    """The windows whose slots come from more than one region: those the cyclic shift filled from opposite edges."""
    r = window_regions(grid, window, shift)
    return [w for w in range(len(r)) if len(r[w].unique()) > 1]


def window_pieces(grid, window: int, shift: int = 0, *, rolled: bool = False
                  ) -> list[tuple[int, int, float, float]]:
    """(window, region, row, col) for each part of a window that is one block of patches in the image (one per
    window without a shift, up to four for a wrapped one); row / col its centre in patches, in the image, or with
    `rolled` in the rolled grid the block cuts (where every window is one block)."""
    H, W = _grid_hw(grid)
    members, regions = window_members(grid, window, shift), window_regions(grid, window, shift)
    if rolled:
        Hp, Wp = H + -H % window, W + -W % window
        where, width = _partition(torch.arange(Hp * Wp).view(Hp, Wp), window), Wp
    else:
        where, width = members, W
    out = []
    for w in range(len(members)):
        for reg in regions[w].unique().tolist():
            at = where[w][(regions[w] == reg) & (members[w] != PAD)]
            if len(at):
                rows, cols = at.div(width, rounding_mode="floor").double(), (at % width).double()
                out.append((w, reg, float(rows.mean()) + 0.5, float(cols.mean()) + 0.5))
    return out


def locate_patch(grid, window: int, shift: int, patch: tuple[int, int]) -> tuple[int, int]:
    """(window, slot) of patch (row, col) of the stage grid in a block's windows."""
    H, W = _grid_hw(grid)
    r, c = patch
    if not (0 <= r < H and 0 <= c < W):
        raise VitlabError(f"patch {patch} is outside the {H}x{W} patch grid of this stage")
    w, k = (window_members(grid, window, shift) == r * W + c).nonzero()[0].tolist()
    return w, k


def centre_patch(grid) -> tuple[int, int]:
    """The patch under the image centre (for an even side, the one just below and right of it)."""
    H, W = _grid_hw(grid)
    return H // 2, W // 2


def window_edges(ids) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments ((x0, y0), (x1, y1)), in patches, between neighbouring patches of different `ids` (H, W), a
    tensor or array: the outlines of windows (of regions, of a mask) over an image, the image border left out."""
    ids = torch.as_tensor(ids)
    segs = [((c + 1, r), (c + 1, r + 1)) for r, c in (ids[:, 1:] != ids[:, :-1]).nonzero().tolist()]
    segs += [((c, r + 1), (c + 1, r + 1)) for r, c in (ids[1:, :] != ids[:-1, :]).nonzero().tolist()]
    return segs


def default_block(layout: list[dict], stage: int = 0) -> int:
    """The block to show: the first block of `stage` with shifted windows, else the stage's first block."""
    blocks = [i for i, b in enumerate(layout) if b["stage"] == stage]
    if not blocks:
        raise VitlabError(f"stage {stage} does not exist: the model has {1 + max(b['stage'] for b in layout)} stages")
    return next((i for i in blocks if layout[i]["shift"]), blocks[0])


def stage_shift(layout: list[dict], stage: int) -> int:
    """The shift of the stage's shifted blocks; a stage whose blocks all stay unshifted (one block, or one window)
    gives the shift such a block would have (window // 2, none when one window covers the grid)."""
    blocks = [b for b in layout if b["stage"] == stage]
    shifted = [b["shift"] for b in blocks if b["shift"]]
    if shifted:
        return shifted[0]
    b = blocks[0]
    return b["window"] // 2 if max(b["grid"]) > b["window"] else 0


def window_attention_map(attn: torch.Tensor, grid, window: int, shift: int, *, patch: tuple[int, int],
                         mean_query: bool = False) -> torch.Tensor:
    """(heads, H, W): one window's attention laid on the stage grid: the window that holds `patch` (row, col),
    the attention from that patch as query (with `mean_query`: the mean over the window's queries) to each
    patch of the window; NaN outside the window. attn: one block's (nW, heads, N, N) for one image."""
    H, W = _grid_hw(grid)
    members = window_members(grid, window, shift)
    w, k = locate_patch(grid, window, shift, patch)
    a = attn[w].float().cpu()  # (heads, N, N)
    keep = members[w] != PAD  # padding slots have no place in the image
    row = a[:, keep].mean(dim=1) if mean_query else a[:, k]  # (heads, N)
    out = torch.full((a.shape[0], H * W), float("nan"))
    out[:, members[w][keep]] = row[:, keep]
    return out.view(-1, H, W)


def stage_pixels(patch_size: int, stage: int) -> int:
    """Side in input pixels of one patch (token) of `stage`: each patch merging doubles it."""
    return patch_size * 2**stage


def window_attention_distance(attns: list[torch.Tensor], layout: list[dict], *, patch_size: int
                              ) -> list[torch.Tensor]:
    """Mean attention distance of every block, a (heads,) tensor each, in input pixels: for each query, the
    attention-weighted distance between the centres of the query's and the key's patch, averaged over the queries
    of every window and image (the ViT paper's measure, inside windows).

    Distances are taken in the image, not in the rolled grid. Padding slots have no place in the image: they
    count neither as queries nor as keys (as the class token for the ViT). attns: per block (B, nW, heads, N, N).
    """
    if len(attns) != len(layout):
        raise VitlabError(f"{len(attns)} attention maps for {len(layout)} blocks")
    out = []
    for a, blk in zip(attns, layout):
        W = blk["grid"][1]
        members = window_members(blk["grid"], blk["window"], blk["shift"]).to(a.device)  # (nW, N)
        keep = members != PAD
        pos = torch.stack([members.div(W, rounding_mode="floor"), members % W], dim=-1).float()  # (nW, N, 2)
        dist = torch.cdist(pos, pos) * stage_pixels(patch_size, blk["stage"])  # (nW, N, N) pixels
        dist = dist * (keep[:, :, None] & keep[:, None, :])
        per_query = torch.einsum("bwhqk,wqk->bhwq", a.float(), dist)  # (B, heads, nW, N)
        n = a.shape[0] * keep.sum()
        out.append((per_query * keep).sum(dim=(0, 2, 3)).div(n).cpu())  # (heads,)
    return out


def uniform_window_distance(window: int, pixels: int) -> float:
    """The mean attention distance of a head that attends uniformly to a whole window of `pixels`-px patches."""
    return float(patch_distances(window, pixels).mean())


def feature_pca_images(maps: torch.Tensor) -> torch.Tensor:
    """One stage's maps (B, C, H, W) -> (B, H, W, 3) in [0, 1]: each position's C channels projected on the first
    three principal components of all positions of all the images (one fit, so a colour means the same direction
    in feature space in every image), each component min-max scaled."""
    B, C, H, W = maps.shape
    x = maps.detach().permute(0, 2, 3, 1).reshape(-1, C).float().cpu()  # (B*H*W, C)
    if x.shape[0] < 2:  # one position of one image: nothing varies
        return torch.zeros(B, H, W, 3)
    p = pca(x, k=3)
    coords = (x - p.mean) @ p.components.T  # (B*H*W, k <= 3)
    coords = torch.cat([coords, torch.zeros(len(coords), 3 - coords.shape[1])], dim=1)
    lo, hi = coords.amin(dim=0), coords.amax(dim=0)
    return ((coords - lo) / (hi - lo).clamp_min(1e-12)).view(B, H, W, 3)
