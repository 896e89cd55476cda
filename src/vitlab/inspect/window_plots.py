"""Swin's figures: windows and shifted windows over an image, one window's attention, attention distance by stage,
and the per-stage feature maps. Arrays come from `vitlab.inspect.windows`; the conventions (no pyplot, sizes,
labels beside images) are those of `vitlab.inspect.plots`.

Windows are numbered from 1 in the block's own order (row-major over the rolled grid), as a learner counts them.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vitlab.inspect.plots import OVERLAY_CMAP, ImageLabel, _clean, _np, _panel_size, to_display
from vitlab.inspect.windows import (
    WRAP_COLORS,
    region_grid,
    stage_pixels,
    uniform_window_distance,
    window_edges,
    window_ids,
    window_mask,
    window_pieces,
    window_regions,
    wrapped_windows,
)

WINDOW_LINE, PATCH_LINE, QUERY_COLOR, MASK_LINE = "white", (1, 1, 1, 0.35), "#ffdd00", "#ff3b30"
HEAT_ALPHA = 0.65
MAX_NUMBERED_WINDOWS = 64  # beyond this, numbers on every window are unreadable


def _wrap_color(i: int) -> str:
    return WRAP_COLORS[i % len(WRAP_COLORS)]


def _show(ax, img: np.ndarray, *, size: tuple[int, int] | None = None) -> None:
    """The image at pixel coordinates (0..W, 0..H), y down; `size` (h, w) extends the axes (a padded grid)."""
    H, W = size or img.shape[:2]
    ax.imshow(img, interpolation="nearest", extent=(0, img.shape[1], img.shape[0], 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    _clean(ax)


def _lines(ax, segments, cell: float, **style) -> None:
    """Segments in patches (`windows.window_edges`) drawn at `cell` pixels per patch."""
    if segments:
        ax.add_collection(LineCollection([[(x0 * cell, y0 * cell), (x1 * cell, y1 * cell)]
                                          for (x0, y0), (x1, y1) in segments], **style))


def _patch_lines(ax, grid: tuple[int, int], cell: float) -> None:
    H, W = grid
    segs = [((c, 0), (c, H)) for c in range(1, W)] + [((0, r), (W, r)) for r in range(1, H)]
    _lines(ax, segs, cell, colors=[PATCH_LINE], linewidths=0.5)


def _tint(ax, ids: np.ndarray, colors: dict[int, str], cell: float, alpha: float = 0.5) -> None:
    """Fill the patches of the windows in `colors` (window id -> colour) over an image."""
    H, W = ids.shape
    rgba = np.zeros((H, W, 4))
    for w, c in colors.items():
        rgba[ids == w] = to_rgba(c, alpha)
    ax.imshow(rgba, interpolation="nearest", extent=(0, W * cell, H * cell, 0))


def _number(ax, x: float, y: float, text: str, *, color: str | None = None, size: float = 7.0) -> None:
    """White text on a dark box, or on a box of the window's `color`."""
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight="bold", color="white",
            bbox=dict(facecolor=color or "black", alpha=0.85 if color else 0.55, pad=0.8, linewidth=0))


def _label_pieces(ax, pieces, cell: float, colors: dict[int, str], n_windows: int,
                  letters: dict[tuple[int, int], str]) -> None:
    """Each window's number at the centre of each of its pieces (a wrapped window has several); the pieces in
    `letters` ((window, region) -> letter) get their letter instead."""
    for w, reg, r, c in pieces:
        if (w, reg) in letters:
            _number(ax, c * cell, r * cell, letters[w, reg], color=colors.get(w), size=8.5)
        elif n_windows <= MAX_NUMBERED_WINDOWS:
            _number(ax, c * cell, r * cell, str(w + 1), color=colors.get(w))


# ---------------------------------------------------------------- windows over the image


def plot_windows(image, *, grid: tuple[int, int], window: int, shift: int, cell: int, title: str,
                 shift_note: str = "") -> Figure:
    """One image (uint8 (3, S, S)) and one stage's windows, in up to four panels: the regular windows; the shifted
    windows in the image, the pieces of each window that wraps around the edges in one colour; the rolled image
    that the shifted block really cuts into regular windows, the borders of its masked regions dashed; and the
    mask of the window that joins the most pieces, its pieces lettered A, B, ... in the panels before.
    `cell`: pixels per patch of the stage; shift 0 draws the first panel only, with `shift_note` under it."""
    img = to_display(_np(image)[None])[0]
    H, W = grid
    size = (H * cell, W * cell)
    panels = 4 if shift else 1
    fig = Figure(figsize=(3.4 * panels + 0.2, 4.7 if shift else 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]

    regular = window_ids(grid, window, 0)
    n_regular = int(regular.max()) + 1
    ax = axes[0]
    _show(ax, img, size=size)
    _patch_lines(ax, grid, cell)
    _lines(ax, window_edges(regular), cell, colors=[WINDOW_LINE], linewidths=2.2)
    _label_pieces(ax, window_pieces(grid, window, 0), cell, {}, n_regular, {})
    ax.set_title(f"Regular windows ({window}x{window} patches)\nin blocks 1, 3, 5, ... of the stage", fontsize=9)
    if not shift:
        ax.set_xlabel(shift_note or "one window covers the whole grid: no shifted windows", fontsize=8)
        fig.suptitle(title, fontsize=10)
        return fig

    regions = window_regions(grid, window, shift)  # (nW, N)
    wrapped = wrapped_windows(grid, window, shift)
    colors = {w: _wrap_color(i) for i, w in enumerate(wrapped)}
    shown = max(wrapped, key=lambda w: (len(regions[w].unique()), w))  # the window whose mask is drawn
    letters = {(shown, reg): "ABCDEFGHI"[i] for i, reg in enumerate(regions[shown].unique().tolist())}
    shifted = window_ids(grid, window, shift)
    n_windows = int(shifted.max()) + 1
    name = f"window {shown + 1} (pieces {'-'.join(letters.values())})" if len(letters) > 1 else \
        f"window {shown + 1}"

    ax = axes[1]  # the shifted windows where they are in the image
    _show(ax, img, size=size)
    _patch_lines(ax, grid, cell)
    _tint(ax, shifted.numpy(), colors, cell)
    _lines(ax, window_edges(shifted), cell, colors=[WINDOW_LINE], linewidths=2.2)
    _label_pieces(ax, window_pieces(grid, window, shift), cell, colors, n_windows, letters)
    ax.set_title(f"Shifted windows (blocks 2, 4, ...): the grid\nmoved by {shift} patches; one colour = one window",
                 fontsize=9)
    ax.set_xlabel(f"windows at the edges wrap around: e.g. {name}\nis made of pieces from the four corners",
                  fontsize=8)

    ax = axes[2]  # what the block computes: roll, then regular windows
    pad = np.ones((size[0], size[1], 3))
    pad[:img.shape[0], :img.shape[1]] = img
    _show(ax, np.roll(pad, (-shift * cell, -shift * cell), axis=(0, 1)))
    _patch_lines(ax, grid, cell)
    _tint(ax, regular.numpy(), colors, cell)  # in the rolled grid the shifted windows are the regular ones
    _lines(ax, window_edges(region_grid(grid, window, shift)[:H, :W]), cell, colors=[MASK_LINE], linewidths=1.8,
           linestyles=(0, (2, 1.5)))
    _lines(ax, window_edges(regular), cell, colors=[WINDOW_LINE], linewidths=2.2)
    _label_pieces(ax, window_pieces(grid, window, shift, rolled=True), cell, colors, n_windows, letters)
    ax.set_title(f"What the block computes: the image rolled\n{shift} patches up and left, cut into regular windows",
                 fontsize=9)
    ax.set_xlabel("red dashes: pieces from opposite edges share a\nwindow but are masked from each other", fontsize=8)

    ax = axes[3]
    _plot_mask(ax, window_mask(grid, window, shift)[shown].numpy(), regions[shown].tolist(), letters, shown)
    ax.set_title(f"Mask of {name}:\nmay query slot (row) attend to key slot (column)?", fontsize=9)
    ax.set_xlabel("white: yes, same piece; dark: no (-100 is added\nbefore the softmax). Slots row-major",
                  fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _plot_mask(ax, allowed: np.ndarray, regions: list[int], letters: dict[tuple[int, int], str], w: int) -> None:
    """The (N, N) mask of one window; slots named by the letter of their piece where there are few enough."""
    N = allowed.shape[0]
    ax.imshow(allowed, cmap=ListedColormap(["#3a3a3a", "white"]), vmin=0, vmax=1, interpolation="nearest")
    if N <= 25:
        names = [letters.get((w, r), "") for r in regions]
        ax.set_xticks(range(N), names, fontsize=7)
        ax.set_yticks(range(N), names, fontsize=7)
        ax.tick_params(length=0, pad=1)
    else:
        _clean(ax)
    ax.set_xlim(-0.5, N - 0.5)
    ax.set_ylim(N - 0.5, -0.5)


# ---------------------------------------------------------------- one window's attention


def plot_window_attention(images, maps, *, labels: list[ImageLabel], grid: tuple[int, int], window: int,
                          cell: int, patch: tuple[int, int] | None, col_titles: list[str], title: str) -> Figure:
    """One row per image: the image with the window outlined (and the query patch, `patch` (row, col), in
    yellow; None: the mean over the window's queries), then each map (B, K, H, W) (`windows.window_attention_map`,
    NaN outside the window) over a crop around the window, on one colour scale from 0."""
    imgs, m = to_display(images), _np(maps)
    B, K, H, W = m.shape
    inside = ~np.isnan(m[0, 0])
    vmax = float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
    rows, cols = np.nonzero(inside)
    margin = max(1, window // 2)
    contiguous = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == inside.sum()
    if contiguous:  # the window and half a window around it
        y0, y1 = max(rows.min() - margin, 0), min(rows.max() + 1 + margin, H)
        x0, x1 = max(cols.min() - margin, 0), min(cols.max() + 1 + margin, W)
    else:  # a window wrapped around the edges: the whole image
        y0, y1, x0, x1 = 0, H, 0, W
    outline = window_edges(inside.astype(np.int64))
    numbers = window <= 4 and contiguous

    s = _panel_size(K + 1.6, 1.9)
    fig = Figure(figsize=(max(s * (K + 1) + 2.3, 7.5), s * B + 1.4), layout="constrained")  # room for the title
    axes = fig.subplots(B, K + 1, squeeze=False)
    outside = np.zeros((H, W, 4))
    outside[~inside] = (0, 0, 0, 0.6)
    for b in range(B):
        ax = axes[b, 0]
        _show(ax, imgs[b], size=(H * cell, W * cell))
        _lines(ax, outline, cell, colors=[QUERY_COLOR], linewidths=1.6)
        if not contiguous:
            ax.imshow(outside, interpolation="nearest", extent=(0, W * cell, H * cell, 0))
        if patch is not None:
            _mark(ax, patch, cell)
        ax.set_ylabel(labels[b].text, color=labels[b].color, fontsize=8, rotation=0, ha="right", va="center",
                      labelpad=4)
        for k in range(K):
            ax = axes[b, k + 1]
            _show(ax, imgs[b], size=(H * cell, W * cell))
            ax.imshow(outside, interpolation="nearest", extent=(0, W * cell, H * cell, 0))
            ax.imshow(np.ma.masked_invalid(m[b, k]), cmap=OVERLAY_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=vmax,
                      interpolation="nearest", extent=(0, W * cell, H * cell, 0))
            _lines(ax, outline, cell, colors=[QUERY_COLOR], linewidths=1.2)
            if patch is not None:
                _mark(ax, patch, cell)
            if numbers:
                for r, c in zip(rows, cols):
                    ax.text((c + 0.5) * cell, (r + 0.5) * cell, f"{100 * m[b, k, r, c]:.0f}", ha="center",
                            va="center", fontsize=6, color="white", fontweight="bold")
            ax.set_xlim(x0 * cell, x1 * cell)
            ax.set_ylim(y1 * cell, y0 * cell)
    axes[0, 0].set_title("image, window in yellow", fontsize=9)
    for k, t in enumerate(col_titles):
        axes[0, k + 1].set_title(t, fontsize=9)
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, vmax), cmap=colormaps[OVERLAY_CMAP]), ax=axes, shrink=0.8,
                      fraction=0.03, pad=0.01)
    cb.set_label("attention probability" + (" (numbers: %)" if numbers else ""))
    fig.suptitle(title, fontsize=10)
    return fig


def _mark(ax, patch: tuple[int, int], cell: float) -> None:
    r, c = patch
    ax.add_patch(Rectangle((c * cell, r * cell), cell, cell, fill=False, edgecolor=QUERY_COLOR, linewidth=2.0))


# ---------------------------------------------------------------- attention distance by stage


def plot_stage_distance(distance: list, layout: list[dict], *, patch_size: int, image_size: int) -> Figure:
    """Mean attention distance (pixels) per head of every block (`windows.window_attention_distance`), blocks
    grouped by stage; a dashed line per stage at the distance of a head that attends uniformly to its window."""
    d = [_np(x) for x in distance]
    L = len(layout)
    heads = max(len(x) for x in d)
    cmap = colormaps["tab20" if heads > 10 else "tab10"]
    fig = Figure(figsize=(max(6.4, 1.1 * L + 2.6), 4.8), layout="constrained")
    ax = fig.subplots()
    labelled: set[str] = set()

    def once(label: str) -> str | None:  # each legend entry the first time only
        if label in labelled:
            return None
        labelled.add(label)
        return label

    top = 0.0
    for i, x in enumerate(d):
        H = len(x)
        offsets = np.linspace(-0.2, 0.2, H) if H > 1 else np.zeros(1)
        for h in range(H):
            ax.scatter(i + 1 + offsets[h], x[h], s=26, color=cmap(h % cmap.N), edgecolors="none", alpha=0.9,
                       label=once(f"head {h + 1}") if heads <= 16 else None, zorder=3)
        top = max(top, float(x.max(initial=0)))
    stages = sorted({b["stage"] for b in layout})
    uniforms = []
    for s in stages:
        idx = [i for i, b in enumerate(layout) if b["stage"] == s]
        lo, hi = idx[0] + 0.5, idx[-1] + 1.5
        blk = layout[idx[0]]
        px = stage_pixels(patch_size, s)
        u = uniform_window_distance(blk["window"], px)
        uniforms.append((lo, hi, u))
        top = max(top, u)
        if s % 2:
            ax.axvspan(lo, hi, color="0.93", zorder=0)
        gh, gw = blk["grid"]
        ax.text((lo + hi) / 2, 1.0, f"stage {s + 1}\n{gh}x{gw} patches of {px} px\nwindow {blk['window']}",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7.5)
    for lo, hi, u in uniforms:
        ax.hlines(u, lo + 0.05, hi - 0.05, colors="0.35", linestyles="--", linewidth=1.1,
                  label=once("uniform over\nthe window"), zorder=2)
    ax.set_xticks(range(1, L + 1), [f"{b['block'] + 1}" + ("\nshifted" if b["shift"] else "") for b in layout],
                  fontsize=8)
    ax.set_xlim(0.5, L + 0.5)
    ax.set_ylim(0, top * 1.45 + 1e-6)  # room for the stage labels
    ax.set_xlabel("block within its stage")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncols=2 if heads > 8 else 1)
    ax.set_title(f"Mean attention distance per head, by stage ({image_size}x{image_size} px images)\n"
                 "how far (attention-weighted) each query looks inside its window", fontsize=10)
    return fig


# ---------------------------------------------------------------- per-stage feature maps


def plot_stage_features(images, features: list, *, labels: list[ImageLabel], col_titles: list[str],
                        title: str) -> Figure:
    """One row per image: the image, then each stage's map as RGB (B, H_i, W_i, 3) in [0, 1]
    (`windows.feature_pca_images`), each at its own resolution over the same square."""
    imgs = to_display(images)
    feats = [_np(f) for f in features]
    B, K = len(imgs), len(feats)
    s = _panel_size(K + 1.6, 1.9)
    fig = Figure(figsize=(s * (K + 1) + 2.0, s * B + 1.1), layout="constrained")
    axes = fig.subplots(B, K + 1, squeeze=False)
    for b in range(B):
        axes[b, 0].imshow(imgs[b], interpolation="nearest")
        axes[b, 0].set_ylabel(labels[b].text, color=labels[b].color, fontsize=8, rotation=0, ha="right",
                              va="center", labelpad=4)
        for k in range(K):
            axes[b, k + 1].imshow(feats[k][b], interpolation="nearest")
    for ax in axes.flat:
        _clean(ax)
    axes[0, 0].set_title("image", fontsize=9)
    for k, t in enumerate(col_titles):
        axes[0, k + 1].set_title(t, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig
