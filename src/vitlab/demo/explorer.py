"""What the demo page shows, computed without Gradio: predictions, rollout, attention maps, patch grid; for a Swin,
its windows and shifted windows and the attention inside one window instead of the rollout.

All the math is `vitlab.inspect`'s (attention, rollout, position similarity) and `vitlab.clip.zeroshot`'s;
this module only picks the arrays for one image and paints them as PIL images at a readable size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw

from vitlab.errors import VitlabError
from vitlab.inspect.attention import (
    ATTENTION_POOLINGS,
    ROLLOUT_CAPTIONS,
    attention_rollout,
    cls_attention,
    forward_with_attention,
    pooling_attention,
    rollout_map,
)
from vitlab.inspect.posemb import position_similarity
from vitlab.inspect.windows import (
    WRAP_COLORS,
    centre_patch,
    is_swin,
    stage_pixels,
    stage_shift,
    window_attention_map,
    window_edges,
    window_ids,
    wrapped_windows,
)
from vitlab.modeldir import ModelDir, open_model_dir

DISPLAY_PX = 384  # images are shown at about this size: CIFAR's 32 px scaled up 12x, pixel for pixel
MEAN_OF_HEADS = "mean"
CLASS_TOKEN, PATCH = "class token", "clicked patch"
WINDOW_MEAN = "mean of the window's patches"  # a Swin's query without a clicked patch
DEFAULT_TEMPLATES = ("a photo of a {}.",)
GRID_COLOR, PICK_COLOR = (255, 255, 255), (255, 221, 0)


@dataclass
class TestImages:
    """The run's test split, when its data can be found: uint8 (N, 3, H, W), labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> tuple[np.ndarray, str]:
        """(H, W, 3) uint8 image, its true class name)."""
        if not 0 <= i < len(self):
            raise VitlabError(f"test image {i} does not exist: choose 0..{len(self) - 1}")
        return self.images[i].permute(1, 2, 0).numpy(), self.classes[int(self.labels[i])]


@dataclass
class View:
    """One analysed image: what the model saw and everything drawn from it (kept in the page's session)."""

    pixels: np.ndarray  # uint8 (S, S, 3): the model input before normalisation
    probs: torch.Tensor | None  # (classes,) softmax probabilities; None for CLIP / SigLIP (zero-shot instead)
    attns: list[torch.Tensor]  # depth x (heads, N, N) attention probabilities (a Swin: (nW, heads, N, N))
    rollout: torch.Tensor | None  # (gh, gw) what the pooled output draws from each patch; None if not defined
    x: torch.Tensor  # (1, 3, S, S) normalised input, for zero-shot with other classes


class Explorer:
    """A model directory opened for the demo: `analyse(image)` -> View, then `*_image(view, ...)` to draw."""

    def __init__(self, src: ModelDir, test_images: TestImages | None = None) -> None:
        self.src = src
        self.tower = src.model.vision if src.kind in ("clip", "siglip") else src.model  # whose attention is shown
        self.cfg = self.tower.cfg
        self.swin = is_swin(self.tower)
        self.layout = self.tower.block_layout() if self.swin else None  # a Swin's blocks: stage, grid, window, ...
        self.prefix = 0 if self.swin else self.tower.num_prefix_tokens
        self.grid = self.cfg.grid_size
        self.size = self.cfg.image_size
        self.scale = max(1, -(-DISPLAY_PX // self.size))  # integer upscaling keeps the pixels square
        self.test_images = test_images

    @classmethod
    def open(cls, model_dir: str | Path, *, data: str | Path | None = None) -> Explorer:
        src = open_model_dir(model_dir).require(("vit", "swin", "clip", "siglip"), "vitlab demo")
        return cls(src, find_test_images(src, data))

    # ---- computing --------------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return self.src.kind not in ("clip", "siglip") and self.cfg.num_classes > 0

    @property
    def class_names(self) -> list[str]:
        return self.src.class_names or [str(i) for i in range(self.cfg.num_classes)]

    @torch.no_grad()
    def analyse(self, image: str | Path | np.ndarray | Image.Image) -> View:
        """Prepare the image as `vitlab predict` does, classify it, and keep its attention. Bad files: VitlabError."""
        # The one place the demo opens an image: prepare() reads files with vitlab.images.open_image, as predict does
        pixels = self.src.preprocess.prepare(image)  # (S, S, 3) uint8
        x = self.src.preprocess.normalize(pixels[None])  # (1, 3, S, S)
        probs = self.src.model(x).float().softmax(-1)[0] if self.is_classifier else None  # predict's forward
        feats, attns = forward_with_attention(self.tower, x)  # (1, N, D), depth x (1, H, N, N)
        if self.swin:  # attention stays in windows: nothing to roll out over the image
            return View(pixels, probs, [a[0] for a in attns], None, x)  # blocks x (nW, heads, N, N)
        rollout = None
        if self.cfg.pooling in ROLLOUT_CAPTIONS:
            pool = pooling_attention(self.tower, feats) if self.cfg.pooling in ATTENTION_POOLINGS else None
            flow = rollout_map(attention_rollout(attns, num_prefix_tokens=self.prefix), pooling=self.cfg.pooling,
                               num_prefix_tokens=self.prefix, pool_attention=pool)  # (1, Np)
            rollout = flow[0].reshape(self.grid, self.grid)
        return View(pixels, probs, [a[0] for a in attns], rollout, x)

    def top_classes(self, view: View, k: int = 5) -> dict[str, float]:
        top = view.probs.topk(min(k, len(view.probs)))
        return {self.class_names[i]: float(p) for p, i in zip(top.values, top.indices)}

    def zero_shot(self, view: View, classes: str, templates: str) -> dict[str, float]:
        """CLIP / SigLIP probabilities for comma-separated class names and one template per line."""
        from vitlab.clip.zeroshot import zero_shot_predict

        names = tuple(c.strip() for c in classes.split(",") if c.strip())
        temps = tuple(t.strip() for t in templates.splitlines() if t.strip())
        if len(names) < 2:
            raise VitlabError("give at least two comma-separated class names")
        probs = zero_shot_predict(self.src.model, self._classifier(names, temps or DEFAULT_TEMPLATES), view.x)[0]
        return {n: float(p) for n, p in zip(names, probs)}

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one Explorer per server; texts are re-encoded only when edited
    def _classifier(self, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        from vitlab.clip.zeroshot import zero_shot_classifier

        return zero_shot_classifier(self.src.model, self.src.tokenizer, names, templates)

    def attention_row(self, view: View, layer: int, head: int | None, query: str, patch: int | None) -> torch.Tensor:
        """(gh, gw) attention paid to each patch in block `layer` (0-based) by one head (None: their mean),
        from the class token (models without one: the mean over patch queries) or from the clicked patch."""
        a = view.attns[layer]  # (H, N, N)
        a = a.mean(0) if head is None else a[head]  # (N, N)
        if query == PATCH and patch is not None:
            row = a[self.prefix + patch, self.prefix:]
        else:
            row = cls_attention(a, num_prefix_tokens=self.prefix, query="cls" if self.cfg.class_token else "patches")
        return row.reshape(self.grid, self.grid)

    def position_similarity(self) -> torch.Tensor | None:
        """(Np, Np) cosine similarities of the patch position embeddings, None for a model without them."""
        if self.swin:  # a relative position bias inside each window instead
            return None
        return position_similarity(self.tower) if self.tower.pos_embed is not None else None

    def patch_at(self, x: float, y: float) -> int:
        """Index of the patch under display pixel (x, y), row-major as the patch embedding flattens them."""
        cell = self.cfg.patch_size * self.scale
        r, c = min(int(y // cell), self.grid - 1), min(int(x // cell), self.grid - 1)
        return max(r, 0) * self.grid + max(c, 0)

    # ---- drawing ----------------------------------------------------------------------------------
    def _base(self, view: View) -> Image.Image:
        return Image.fromarray(view.pixels).resize((self.size * self.scale,) * 2, Image.Resampling.NEAREST)

    def overlay_image(self, view: View, heat: torch.Tensor, *, patch: int | None = None) -> Image.Image:
        """The input with a (gh, gw) map over it, scaled to its own min..max (turbo colours, as `vitlab explain`)."""
        from matplotlib import colormaps

        from vitlab.inspect.plots import OVERLAY_ALPHA, OVERLAY_CMAP

        h = heat.float().numpy()
        h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
        side = self.size * self.scale
        h = np.asarray(Image.fromarray(h.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR))
        colours = (colormaps[OVERLAY_CMAP](np.clip(h, 0, 1))[..., :3] * 255).astype(np.float32)
        mixed = (1 - OVERLAY_ALPHA) * np.asarray(self._base(view), np.float32) + OVERLAY_ALPHA * colours
        out = Image.fromarray(mixed.round().astype(np.uint8))
        return self._mark(out, patch) if patch is not None else out

    def patch_grid_image(self, view: View, patch: int | None = None) -> Image.Image:
        """The model's input at its input size, cut into its patches (click one to query it)."""
        img = self._base(view)
        draw = ImageDraw.Draw(img)
        cell, side = self.cfg.patch_size * self.scale, self.size * self.scale
        for k in range(1, self.grid):
            draw.line([(k * cell, 0), (k * cell, side)], fill=GRID_COLOR, width=1)
            draw.line([(0, k * cell), (side, k * cell)], fill=GRID_COLOR, width=1)
        return self._mark(img, patch) if patch is not None else img

    def _mark(self, img: Image.Image, patch: int) -> Image.Image:
        cell = self.cfg.patch_size * self.scale
        r, c = divmod(patch, self.grid)
        ImageDraw.Draw(img).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                      outline=PICK_COLOR, width=max(2, self.scale // 3))
        return img

    # ---- Swin: windows ---------------------------------------------------------------------------
    def stage_patch(self, block: int, patch: int | None) -> tuple[int, int]:
        """(row, col) in `block`'s stage grid of the input patch `patch` (None: the patch under the image centre)."""
        blk = self.layout[block]
        if patch is None:
            return centre_patch(blk["grid"])
        r, c = divmod(patch, self.grid)
        return r >> blk["stage"], c >> blk["stage"]

    def window_attention(self, view: View, block: int, head: int | None, query: str, patch: int | None
                         ) -> torch.Tensor:
        """(H, W) over `block`'s stage grid: the attention inside the window that holds `patch` (an input patch,
        None: the image centre), from that patch (query PATCH) or averaged over the window's queries, by one head
        (None, or one the block does not have: their mean); NaN outside the window."""
        blk = self.layout[block]
        maps = window_attention_map(view.attns[block], blk["grid"], blk["window"], blk["shift"],
                                    patch=self.stage_patch(block, patch), mean_query=query != PATCH)  # (heads, H, W)
        return maps[head] if head is not None and head < len(maps) else maps.mean(dim=0)

    def _cells(self, block: int) -> tuple[int, tuple[int, int]]:
        """(display pixels per patch of `block`'s stage, the stage grid)."""
        blk = self.layout[block]
        return stage_pixels(self.cfg.patch_size, blk["stage"]) * self.scale, blk["grid"]

    def _draw_windows(self, img: Image.Image, ids: torch.Tensor, cell: int, *, color=GRID_COLOR, width: int = 3):
        draw = ImageDraw.Draw(img)
        for (x0, y0), (x1, y1) in window_edges(ids):
            draw.line([(x0 * cell, y0 * cell), (x1 * cell, y1 * cell)], fill=color, width=width)
        return img

    def windows_image(self, view: View, block: int) -> Image.Image:
        """The input twice, side by side: the regular windows of `block`'s stage (left) and its shifted windows
        (right), each window that wraps around the edges tinted in one colour."""
        cell, grid = self._cells(block)
        blk = self.layout[block]
        ws, shift = blk["window"], stage_shift(self.layout, blk["stage"])
        panels = [self._draw_windows(self._base(view), window_ids(grid, ws, 0), cell)]
        if shift:
            ids = window_ids(grid, ws, shift)
            tint = np.zeros((*ids.shape, 4), np.uint8)
            for i, w in enumerate(wrapped_windows(grid, ws, shift)):
                tint[(ids == w).numpy()] = (*ImageColor.getrgb(WRAP_COLORS[i % len(WRAP_COLORS)]), 120)
            side = self.size * self.scale
            layer = Image.fromarray(tint.repeat(cell, 0).repeat(cell, 1)[:side, :side], mode="RGBA")
            img = Image.alpha_composite(self._base(view).convert("RGBA"), layer).convert("RGB")
            panels.append(self._draw_windows(img, ids, cell))
        gap = 16
        out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white")
        for i, p in enumerate(panels):
            out.paste(p, (i * (p.width + gap), 0))
        return out

    def window_attention_image(self, view: View, block: int, head: int | None, query: str, patch: int | None
                               ) -> Image.Image:
        """The input with `window_attention` over its window (turbo colours from 0 to the map's max), the rest of the
        image dimmed, the window outlined and the query patch marked."""
        from matplotlib import colormaps

        from vitlab.inspect.plots import OVERLAY_ALPHA, OVERLAY_CMAP

        cell, _ = self._cells(block)
        heat = self.window_attention(view, block, head, query, patch).numpy()  # (H, W), NaN outside the window
        inside = ~np.isnan(heat)
        top = float(np.nanmax(heat)) if inside.any() else 1.0
        side = self.size * self.scale
        colours = colormaps[OVERLAY_CMAP](np.nan_to_num(heat) / max(top, 1e-12))[..., :3] * 255  # (H, W, 3)

        def big(a: np.ndarray) -> np.ndarray:  # stage grid -> display pixels (a padded grid overhangs: cut)
            return a.repeat(cell, 0).repeat(cell, 1)[:side, :side]

        base = np.asarray(self._base(view), np.float32)
        alpha = np.where(big(inside), OVERLAY_ALPHA, 0.0)[..., None]
        mixed = (1 - alpha) * base + alpha * big(colours)
        mixed[~big(inside)] *= 0.35  # outside the window: this block cannot see it
        img = self._draw_windows(Image.fromarray(mixed.round().astype(np.uint8)), torch.as_tensor(inside).long(), cell,
                                 color=PICK_COLOR, width=2)
        if query == PATCH:
            r, c = self.stage_patch(block, patch)
            ImageDraw.Draw(img).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                          outline=PICK_COLOR, width=max(2, self.scale // 3))
        return img

    def position_figure(self):
        """ViT Fig. 7 (centre) for this model, a matplotlib Figure; None without position embeddings."""
        from vitlab.inspect.plots import plot_position_similarity

        sim = self.position_similarity()
        if sim is None:
            return None
        return plot_position_similarity(sim, grid=(self.grid, self.grid), kind=self.cfg.pos_embed)

    def summary(self) -> str:
        what = f"{self.cfg.num_classes} classes" if self.is_classifier else \
            f"{self.src.kind.upper()} (zero-shot)" if self.src.kind in ("clip", "siglip") else "no classifier"
        return f"{self.tower.summary()}, {what}; patches {self.cfg.patch_size} px, {self.grid}x{self.grid} grid"


def find_test_images(src: ModelDir, data: str | Path | None = None) -> TestImages | None:
    """The test split of the run's dataset (train_config.json; CIFAR-10 for dirs without one).

    `data` given: from there, and a failure is an error. Otherwise from the root the run recorded, then
    $VITLAB_DATA / the default cache; None when neither has it (the page then offers uploads only).
    """
    from vitlab.data import load_dataset
    from vitlab.rundir import RUN_CONFIG
    from vitlab.weights import read_json

    record = read_json(src.path / RUN_CONFIG).get("data", {}) if (src.path / RUN_CONFIG).is_file() else {}
    name = record.get("dataset", "cifar10")

    def load(root):
        ds = load_dataset(name, root, "test", image_size=src.preprocess.output_size)
        return TestImages(ds.images, ds.labels, list(ds.classes), f"{name} test split")

    if data is not None:
        return load(data)
    for root in dict.fromkeys((record.get("root"), None)):
        try:
            return load(root)
        except (VitlabError, OSError):
            continue
    return None
