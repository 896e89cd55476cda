"""`vitlab explain` for a Swin model: the views that replace the ViT's (which `explain_run` leaves out for it).

- the windows and the shifted windows of stage 1 over an image, and the mask of a wrapped window;
- the attention inside one window (the one under the image centre) in one block, per head;
- mean attention distance per head of every block, grouped by stage;
- every stage's output feature map (`forward_intermediates`) as a colour image.

Predictions, embeddings, patch filters, curves and the confusion matrix are `explain_run`'s own, for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from vitlab.inspect.attention import forward_with_attention
from vitlab.inspect.images import model_inputs
from vitlab.inspect.windows import (
    centre_patch,
    default_block,
    feature_pca_images,
    is_swin,
    stage_pixels,
    stage_shift,
    window_attention_distance,
    window_attention_map,
)

__all__ = ["SwinAnalysis", "analyse_swin", "is_swin", "swin_model_rows", "swin_sections",
           "window_attention_figure"]

MAX_ROWS = 4  # images in the window-attention and feature figures: each row is a wide strip
MAX_HEADS = 8  # head columns in the window-attention figure (then the mean of all heads)
LEFT_OUT = ("a Swin model: the ViT-only views are left out: class-token attention and attention rollout (attention "
            "stays inside windows that change from block to block, so no image-wide token-to-token matrix exists "
            "to follow) and position-embedding similarity (Swin has no absolute position embedding, only a "
            "relative position bias inside each window)")


@dataclass
class SwinAnalysis:
    preds: torch.Tensor | None  # (B,) or None for a model without a classifier
    confidence: torch.Tensor | None  # (B,) softmax probability of the prediction
    embeddings: torch.Tensor  # (B, F) pooled features, what the head sees
    distance: list[torch.Tensor]  # per block (heads,) pixels, averaged over all images
    attns: list[torch.Tensor]  # per block (S, nW, heads, N, N) for the first S images only
    features: list[torch.Tensor]  # per stage (S, C_i, H_i, W_i) for the first S images only


@torch.no_grad()
def analyse_swin(run, inputs, *, show: int, batch_size: int = 64) -> SwinAnalysis:
    """Predictions, embeddings and attention distances of all `inputs`; attention and stage maps of the first `show`."""
    model = run.model.eval()
    layout = model.block_layout()
    preds, conf, embs, kept_attn, kept_maps = [], [], [], [], []
    dist_sum, n_seen = None, 0
    with tqdm(total=len(inputs.images), unit="img", desc="explain", leave=False) as bar:
        for batch in inputs.images.split(batch_size):
            x = model_inputs(run.preprocess, batch).to(model.device)  # (b, 3, S, S) float
            logits, attns = forward_with_attention(model, x)  # (b, classes), blocks x (b, nW, heads, N, N)
            final, maps = model.forward_intermediates(x)  # (b, H, W, C) normed, stages x (b, C_i, H_i, W_i)
            if model.cfg.num_classes:
                c, k = logits.float().softmax(dim=-1).max(dim=-1)
                preds.append(k.cpu())
                conf.append(c.cpu())
            embs.append(model.forward_head(final, pre_logits=True).float().cpu())
            d = [v * len(batch) for v in window_attention_distance(attns, layout, patch_size=model.cfg.patch_size)]
            dist_sum = d if dist_sum is None else [a + b for a, b in zip(dist_sum, d)]
            n_seen += len(batch)
            take = show - sum(len(a[0]) for a in kept_attn)
            if take > 0:
                kept_attn.append([a[:take].cpu() for a in attns])
                kept_maps.append([m[:take].float().cpu() for m in maps])
            bar.update(len(batch))
    return SwinAnalysis(
        preds=torch.cat(preds) if preds else None,
        confidence=torch.cat(conf) if conf else None,
        embeddings=torch.cat(embs),
        distance=[v / n_seen for v in dist_sum],
        attns=[torch.cat(block) for block in zip(*kept_attn)],
        features=[torch.cat(stage) for stage in zip(*kept_maps)],
    )


def windows_figure(model, image: torch.Tensor, *, stage: int = 0):
    """`window_plots.plot_windows` for one image (uint8 (3, S, S)) and the windows of `stage`."""
    from vitlab.inspect.window_plots import plot_windows

    cfg, layout = model.cfg, model.block_layout()
    blk, shift = next(b for b in layout if b["stage"] == stage), stage_shift(layout, stage)
    note = f" ({unused_shift_note(layout, stage)})" if unused_shift_note(layout, stage) else ""
    gh, gw = blk["grid"]
    px = stage_pixels(cfg.patch_size, stage)
    return plot_windows(image, grid=blk["grid"], window=blk["window"], shift=shift, cell=px,
                        title=f"Stage {stage + 1}: attention only inside windows of {blk['window']}x{blk['window']} "
                              f"patches ({gh}x{gw} patches of {px} px){note}")


def unused_shift_note(layout: list[dict], stage: int) -> str:
    """Words for a stage whose shifted windows are drawn but never used (its only block is unshifted), else ""."""
    blocks = [b for b in layout if b["stage"] == stage]
    if stage_shift(layout, stage) and not any(b["shift"] for b in blocks):
        return f"this model's stage {stage + 1} has a single block, so it never uses the shifted windows shown"
    return ""


def window_attention_figure(model, images: torch.Tensor, attn: torch.Tensor, *, block: int, labels: list,
                            title_prefix: str = ""):
    """`window_plots.plot_window_attention` of `block`: the window under the image centre, from its centre patch;
    images uint8 (B, 3, S, S), attn that block's (B, nW, heads, N, N)."""
    from vitlab.inspect.window_plots import plot_window_attention

    blk = model.block_layout()[block]
    grid, ws, shift, heads = blk["grid"], blk["window"], blk["shift"], blk["heads"]
    patch = centre_patch(grid)
    maps = torch.stack([window_attention_map(a, grid, ws, shift, patch=patch) for a in attn])  # (B, heads, H, W)
    shown = min(heads, MAX_HEADS)
    cols = [f"head {h + 1}" for h in range(shown)]
    if heads > 1:
        maps = torch.cat([maps[:, :shown], maps.mean(dim=1, keepdim=True)], dim=1)
        cols.append(f"mean of {heads} heads")
    kind = f"shifted windows, shift {shift}" if shift else "regular windows"
    more = f" (first {shown} of {heads} heads)" if heads > shown else ""
    title = (f"{title_prefix}Stage {blk['stage'] + 1}, block {blk['block'] + 1} ({kind}){more}:\nattention from the "
             f"query patch (yellow square, under the image centre) to the {ws * ws} patches\nof its {ws}x{ws} window; "
             "the rest of the image is dimmed: this block cannot see it")
    return plot_window_attention(images, maps, labels=labels, grid=grid, window=ws, patch=patch, col_titles=cols,
                                 cell=stage_pixels(model.cfg.patch_size, blk["stage"]), title=title)


def swin_sections(run, inputs, an: SwinAnalysis, sections, labels: list) -> None:
    """The Swin views into `sections` (explain's collector): windows, one window's attention, distance, stage maps."""
    from vitlab.inspect.window_plots import plot_stage_distance, plot_stage_features

    model, cfg = run.model, run.model.cfg
    layout = model.block_layout()
    rows = min(len(an.attns[0]), MAX_ROWS)
    imgs, labels = inputs.images[:rows], labels[:rows]
    first, shift, unused = layout[0], stage_shift(layout, 0), unused_shift_note(layout, 0)
    what = (f"Swin never attends over the whole image: each block cuts the patch grid into windows of "
            f"{first['window']}x{first['window']} patches and attends only inside each.")
    if shift:
        what += (f" Every second block shifts the windows by {shift} patches so that neighbouring windows exchange "
                 "information. To keep every window full, the block rolls the image instead (third panel): the "
                 "strips that fall off one edge come back at the other, and a mask (fourth panel) stops patches "
                 "that are not neighbours in the image from attending to each other.")
    sections.add(windows_figure(model, inputs.images[0]), "windows.png", "Windows and shifted windows",
                 what + (f" Note: {unused}." if unused else ""))

    b = default_block(layout, 0)
    sections.add(window_attention_figure(model, imgs, an.attns[b][:rows], block=b, labels=labels),
                 "window_attention.png", "Attention inside one window",
                 f"Block {layout[b]['block'] + 1} of stage 1 ({'shifted' if layout[b]['shift'] else 'regular'} "
                 "windows): for the patch under the image centre as query, the softmax attention over the patches "
                 "of its window, per head and averaged; all panels share one colour scale. Everything outside the "
                 "window gets no attention from this query in this block.")

    sections.add(plot_stage_distance(an.distance, layout, patch_size=cfg.patch_size, image_size=cfg.image_size),
                 "attention_distance.png", "Mean attention distance by stage",
                 f"For each head of each block: the attention-weighted pixel distance between query and key patch, "
                 f"averaged over queries, windows and {len(inputs.images)} images (the ViT paper's Fig. 7 measure). "
                 "A window spans more pixels in each stage (patches merge 2x2), so the reach grows with depth; the "
                 "dashed lines are what a head attending uniformly to its window would have.")

    feats = [feature_pca_images(f[:rows]) for f in an.features]
    cols = [f"stage {i + 1}: {f.shape[2]}x{f.shape[3]}\n{f.shape[1]} channels" for i, f in enumerate(an.features)]
    sections.add(plot_stage_features(imgs, feats, labels=labels, col_titles=cols,
                                     title="The pyramid: each stage's output map (forward_intermediates), its first 3 "
                                           "principal components as RGB\n(one PCA per stage over these images); "
                                           "patch merging halves the grid and doubles the channels"),
                 "stage_features.png", "Feature maps of every stage",
                 "Each stage's output, one pixel per token, coloured by the first three principal components of its "
                 "channels (fitted over the images shown, so a colour means the same feature in each row). Like a "
                 "CNN, Swin works on ever coarser grids with ever more channels.")


def swin_model_rows(model) -> list[tuple[str, str]]:
    """The report's summary rows that describe a Swin model: the model, and its stages."""
    cfg = model.cfg
    stages = []
    for s in range(cfg.num_stages):
        blocks = [b for b in model.block_layout() if b["stage"] == s]
        gh, gw = blocks[0]["grid"]
        shifted = sum(1 for b in blocks if b["shift"])
        stages.append(f"{s + 1}: {gh}x{gw} tokens of {stage_pixels(cfg.patch_size, s)} px, {cfg.stage_dims[s]} "
                      f"channels, {len(blocks)} blocks ({shifted} shifted), {blocks[0]['heads']} heads, window "
                      f"{blocks[0]['window']}")
    return [("model", model.summary()),
            ("tokens", f"{cfg.image_size}x{cfg.image_size} images, {cfg.patch_size}x{cfg.patch_size} patches, "
                       f"{cfg.window_size}x{cfg.window_size} windows, pooling: {cfg.global_pool}"),
            ("stages", "; ".join(stages))]
