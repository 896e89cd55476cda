"""All the drawing: each function takes arrays from the computing modules and returns a matplotlib Figure
(inspect's views, and the trainer's curves and confusion matrix).

Figures are built with `matplotlib.figure.Figure` (no pyplot): no global state, no GUI backend, nothing to
close, and notebooks still display them. `save_figure` writes a PNG whose pixel size is exactly
figsize x dpi (no tight cropping), so callers know what they get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from vitlab.weights import atomic_write

DPI = 130
OVERLAY_CMAP = "turbo"
OVERLAY_ALPHA = 0.5
MAX_WIDTH_IN = 16.0  # inches: wider figures shrink their panels instead
CORRECT, WRONG, UNKNOWN = "#1a7f37", "#c62828", "#333333"


@dataclass(frozen=True)
class ImageLabel:
    """What is written beside an image: predicted / true class; colour says right or wrong."""

    text: str
    correct: bool | None = None  # None: no true label known

    @property
    def color(self) -> str:
        return UNKNOWN if self.correct is None else CORRECT if self.correct else WRONG


def save_figure(fig: Figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG of exactly figsize * dpi pixels, atomically (a crash never leaves half a PNG);
    no tool name or URL in the metadata. The one function every vitlab figure is written with."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None}))
    return path


def figure_pixels(fig: Figure, *, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels that `save_figure` will write."""
    w, h = fig.get_size_inches()
    return round(w * dpi), round(h * dpi)


# ---------------------------------------------------------------- helpers


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def to_display(images) -> np.ndarray:
    """uint8 (B, 3, H, W) (or float in [0, 1]) -> float (B, H, W, 3) in [0, 1] for imshow."""
    arr = _np(images)
    x = arr.astype(np.float32) / (255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0)
    return np.clip(x.transpose(0, 2, 3, 1), 0.0, 1.0)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _panel_size(cols: int, preferred: float) -> float:
    return min(preferred, MAX_WIDTH_IN / cols)


def _overlay(ax, image: np.ndarray, heat: np.ndarray) -> None:
    """Image with a heat map (any grid) stretched over it, scaled to [0, 1] by its own min and max.

    The map's true maximum is written in a corner: min-max scaling makes a nearly uniform map look as
    peaked as a sharp one, and the number keeps the reader honest.
    """
    H, W = image.shape[:2]
    ax.imshow(image, interpolation="nearest", extent=(0, W, H, 0))
    ax.imshow(_minmax(heat), cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1,
              interpolation="bilinear", extent=(0, W, H, 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.text(0.03, 0.03, f"max {float(np.max(heat)):.2g}", transform=ax.transAxes, fontsize=6.5, color="white",
            va="bottom", ha="left", bbox=dict(facecolor="black", alpha=0.55, pad=1.2, linewidth=0))


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay_colorbar(fig: Figure, axes) -> None:
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=colormaps[OVERLAY_CMAP]), ax=axes, shrink=0.8,
                      fraction=0.03, pad=0.01)
    cb.set_label("attention (each map scaled to its own min..max)")


# ---------------------------------------------------------------- attention


def plot_attention_grid(images, maps, *, labels: list[ImageLabel], col_titles: list[str], title: str) -> Figure:
    """One row per image: the image (labels beside it), then one overlay per map.

    images: uint8 (B, 3, H, W); maps: (B, K, gh, gw), e.g. K heads of one layer or K layers.
    """
    imgs, maps = to_display(images), _np(maps)
    B, K = maps.shape[:2]
    s = _panel_size(K + 1.5, 1.6)
    fig = Figure(figsize=(s * (K + 1) + 1.9, s * B + 0.9), layout="constrained")
    axes = fig.subplots(B, K + 1, squeeze=False)
    for b in range(B):
        axes[b, 0].imshow(imgs[b], interpolation="nearest")
        axes[b, 0].set_ylabel(labels[b].text, color=labels[b].color, fontsize=8, rotation=0, ha="right",
                              va="center", labelpad=4)
        for k in range(K):
            _overlay(axes[b, k + 1], imgs[b], maps[b, k])
    for ax in axes.flat:
        _clean(ax)
    axes[0, 0].set_title("image", fontsize=9)
    for k, t in enumerate(col_titles):
        axes[0, k + 1].set_title(t, fontsize=9)
    _overlay_colorbar(fig, axes)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_rollout(images, maps, *, labels: list[ImageLabel], title: str) -> Figure:
    """Images in a row on top, the rollout overlay under each; maps (B, gh, gw)."""
    imgs, maps = to_display(images), _np(maps)
    B = maps.shape[0]
    s = _panel_size(B + 0.5, 1.9)
    fig = Figure(figsize=(s * B + 1.0, 2 * s + 1.0), layout="constrained")
    axes = fig.subplots(2, B, squeeze=False)
    for b in range(B):
        axes[0, b].imshow(imgs[b], interpolation="nearest")
        axes[0, b].set_title(labels[b].text, color=labels[b].color, fontsize=8)
        _overlay(axes[1, b], imgs[b], maps[b])
    for ax in axes.flat:
        _clean(ax)
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("rollout", fontsize=9)
    _overlay_colorbar(fig, axes)
    fig.suptitle(title, fontsize=10, wrap=True)
    return fig


def plot_attention_distance(distance, *, patch_size: int, image_size: int, uniform: float | None = None
                            ) -> Figure:
    """Scatter of mean attention distance (pixels) per head against depth; distance (L, H)."""
    d = _np(distance)
    L, H = d.shape
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab20" if H > 10 else "tab10"]
    depth = np.arange(1, L + 1)
    offsets = np.linspace(-0.18, 0.18, H) if H > 1 else np.zeros(1)  # side by side, so no head hides another
    for h in range(H):
        ax.scatter(depth + offsets[h], d[:, h], s=28, color=cmap(h % cmap.N), label=f"head {h + 1}", alpha=0.9,
                   edgecolors="none")
    if uniform is not None:  # in the legend, not on the plot: a label there would sit on the points
        ax.axhline(uniform, color="0.4", ls="--", lw=1, label=f"uniform attention\n({uniform:.1f} px)")
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(depth)
    ax.set_xlim(0.5, L + 0.5)
    ax.set_ylim(0, max(float(d.max(initial=0)), uniform or 0) * 1.12 + 1e-6)
    ax.grid(alpha=0.3)
    ax.set_title(f"Mean attention distance per head ({image_size}x{image_size} px images, "
                 f"{patch_size} px patches)", fontsize=10)
    if H <= 16:
        ax.legend(fontsize=7, ncols=2 if H > 8 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
    elif uniform is not None:
        ax.legend(handles=ax.lines[-1:], fontsize=7, loc="lower right")
    return fig


# ---------------------------------------------------------------- weights


def similarity_mosaic(sim, grid: tuple[int, int]) -> np.ndarray:
    """(Np, Np) similarities -> one (gh*(gh+1)-1, gw*(gw+1)-1) image: tile (r, c) = row r*gw+c, NaN gaps."""
    s = _np(sim)
    gh, gw = grid
    out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan, dtype=np.float32)
    for i in range(gh * gw):
        r, c = divmod(i, gw)
        out[r * (gh + 1): r * (gh + 1) + gh, c * (gw + 1): c * (gw + 1) + gw] = s[i].reshape(gh, gw)
    return out


def plot_position_similarity(sim, *, grid: tuple[int, int], kind: str) -> Figure:
    """ViT Fig. 7 centre: a grid of small heatmaps, one per patch position, sharing one colour bar."""
    gh, gw = grid
    mosaic = similarity_mosaic(sim, grid)
    side = min(8.0, max(4.5, 0.5 * gw + 2.0))
    fig = Figure(figsize=(side + 1.3, side * gh / gw + 0.7), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="white")  # NaN gaps between tiles
    # Colours span the data (up to the diagonal's 1): sin-cos tables never go far below 0.5, and a fixed
    # [-1, 1] range would wash their structure out. The shared colour bar gives the scale.
    im = ax.imshow(mosaic, cmap=cmap, vmin=float(np.nanmin(mosaic)), vmax=1.0, interpolation="nearest")
    step = max(1, math.ceil(gw / 14))  # keep tick labels legible on big grids
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(0, gw, step)], [str(c + 1) for c in range(0, gw, step)])
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(0, gh, step)], [str(r + 1) for r in range(0, gh, step)])
    ax.tick_params(length=0, labelsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    ax.set_title(f"Position embedding similarity ({kind}, {gh}x{gw} patches)\n"
                 "tile (row, column): similarity of that position's embedding with every position", fontsize=10)
    return fig


def plot_patch_filters(components, *, explained_variance_ratio=None, cols: int = 7, title: str | None = None,
                       tile_prefix: str = "PC") -> Figure:
    """ViT Fig. 7 left: principal components of the patch filters (k, C, P, P) as min-max scaled RGB tiles;
    `title` / `tile_prefix` name other filters drawn the same way (the conv stem's kernels)."""
    comps = _np(components)
    k, C = comps.shape[:2]
    rows, cols = math.ceil(k / cols), min(cols, k)
    fig = Figure(figsize=(1.2 * cols + 0.4, 1.3 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    ratio = None if explained_variance_ratio is None else _np(explained_variance_ratio)
    for i, ax in enumerate(axes.flat):
        _clean(ax)
        if i >= k:
            ax.set_axis_off()
            continue
        tile = _minmax(comps[i])  # (C, P, P), each tile on its own scale
        if C >= 3:
            ax.imshow(tile[:3].transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(tile[0], cmap="gray", interpolation="nearest")
        pct = f" ({100 * ratio[i]:.2g}%)" if ratio is not None else ""
        ax.set_title(f"{tile_prefix}{i + 1}{pct}", fontsize=8)
    P = comps.shape[-1]
    fig.suptitle(title or f"Patch embedding filters: first {k} principal components ({P}x{P} px, RGB)\n"
                          "each tile scaled to its own min..max; % = share of the filters' variance", fontsize=10)
    return fig


# ---------------------------------------------------------------- embeddings


def _class_colors(n: int):
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i % cmap.N) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_embeddings(panels: list[tuple[str, object]], *, classes, class_names: list[str], what: str,
                    colored_by: str) -> Figure:
    """Side-by-side 2-D scatters (e.g. PCA, t-SNE) of the same points, coloured by class index `classes`."""
    cls = _np(classes).astype(int)
    colors = _class_colors(len(class_names))
    fig = Figure(figsize=(4.6 * len(panels) + 1.8, 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    present = sorted(set(cls.tolist()))
    for ax, (name, xy) in zip(axes, panels):
        xy = _np(xy)
        for c in present:
            m = cls == c
            ax.scatter(xy[m, 0], xy[m, 1], s=10, color=colors[c], label=class_names[c], alpha=0.8,
                       edgecolors="none")
        ax.set_title(name, fontsize=10)
        axis = "principal component" if name == "PCA" else name
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
        ax.grid(alpha=0.3)
    if len(class_names) <= 20:
        axes[-1].legend(title=colored_by, fontsize=8, title_fontsize=8, loc="center left",
                        bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.8)
    fig.suptitle(f"{what} of {len(cls)} images in 2-D, coloured by {colored_by}", fontsize=11)
    return fig


# ---------------------------------------------------------------- training


def plot_curves(rows: list[dict], *, title: str = "") -> Figure:
    """Loss, accuracy and learning-rate panels against epochs, from metrics.jsonl rows."""
    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> list[float] | None:
        vals = [r.get(key) for r in rows]
        return None if all(v is None for v in vals) else [math.nan if v is None else v for v in vals]

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("Loss", "loss", [("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")], 1),
        ("Accuracy", "accuracy (%)", [("train_acc", "train top-1"), ("val_top1", "val top-1"),
                                      ("test_top1", "test top-1"), ("test_top5", "test top-5")], 100),
        ("Learning rate (end of epoch)", "learning rate", [("lr", "lr")], 1),
    ]
    for ax, (name, ylabel, keys, scale) in zip(axes, panels):
        for key, label in keys:
            ys = series(key)
            if ys is not None:
                ax.plot(epochs, [y * scale for y in ys], marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
        if len(ax.lines) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion(confusion, classes: list[str], *, title: str) -> Figure:
    """Row-normalised confusion matrix (rows: true class) with class names on both axes."""
    c = _np(confusion).astype(np.float64)
    frac = c / np.maximum(c.sum(1, keepdims=True), 1)  # (K, K), each row sums to 1
    K = len(classes)
    side = max(6.0, 0.45 * K + 2)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(K)
    fontsize = 9 if K <= 20 else 5
    ax.set_xticks(ticks, classes, rotation=45 if K <= 20 else 90, ha="right", fontsize=fontsize)
    ax.set_yticks(ticks, classes, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if K <= 20:
        for i in range(K):
            for j in range(K):
                if c[i, j]:
                    ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    return fig
