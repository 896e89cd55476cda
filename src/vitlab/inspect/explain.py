"""`explain_run`: compute every view of a trained ViT (or Swin: `vitlab.inspect.explain_swin`), draw it to PNGs and
gather them in report.html.

The images are streamed in batches: predictions, embeddings and attention distances are reduced as they
go, and full attention matrices are kept only for the few images that get drawn, so big models and many
test images fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.inspect.attention import (
    ATTENTION_POOLINGS,
    ROLLOUT_CAPTIONS,
    attention_rollout,
    cls_attention,
    forward_with_attention,
    pooling_attention,
    rollout_map,
    to_grid,
)
from vitlab.inspect.distance import mean_attention_distance, patch_distances
from vitlab.inspect.embeddings import has_tsne, pca_2d, tsne_2d
from vitlab.inspect.explain_swin import (
    LEFT_OUT,
    analyse_swin,
    is_swin,
    swin_model_rows,
    swin_sections,
    window_attention_figure,
)
from vitlab.inspect.filters import patch_filter_pca, stem_kernels
from vitlab.inspect.images import model_inputs
from vitlab.inspect.posemb import position_similarity
from vitlab.inspect.report import Section, write_report
from vitlab.inspect.rundir import Run, confusion_matrix


@dataclass
class Inputs:
    """Images to explain, already at the model's image size."""

    images: torch.Tensor  # uint8 (B, 3, S, S)
    labels: torch.Tensor  # int64 (B,), -1 where the true class is unknown
    source: str  # e.g. "first 256 CIFAR-10 test images"


@dataclass
class Analysis:
    preds: torch.Tensor | None  # (B,) or None for a model without a classifier
    confidence: torch.Tensor | None  # (B,) softmax probability of the prediction
    embeddings: torch.Tensor  # (B, F)
    distance: torch.Tensor  # (L, H) pixels, averaged over all images
    attns: list[torch.Tensor]  # per layer (S, H, N, N) for the first S images only
    pool_attn: torch.Tensor | None  # (S, H, Np) the pooling's weights over the patches, map / seq pooling only


@dataclass
class ExplainResult:
    report: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def analyse(run: Run, inputs: Inputs, *, show: int, batch_size: int = 64) -> Analysis:
    model = run.model.eval()
    cfg = model.cfg
    p = model.num_prefix_tokens
    preds, conf, embs, kept, kept_pool = [], [], [], [], []
    dist_sum, n_seen = None, 0
    with tqdm(total=len(inputs.images), unit="img", desc="explain", leave=False) as bar:
        for batch in inputs.images.split(batch_size):
            x = model_inputs(run.preprocess, batch).to(model.device)  # (b, 3, S, S) float
            feats, attns = forward_with_attention(model, x)  # (b, N, D), L x (b, H, N, N)
            if cfg.num_classes:
                prob = model.forward_head(feats).float().softmax(dim=-1)  # (b, classes)
                c, k = prob.max(dim=-1)
                preds.append(k.cpu())
                conf.append(c.cpu())
            embs.append(model.forward_head(feats, pre_logits=True).float().cpu())
            d = mean_attention_distance(attns, grid=cfg.grid_size, patch_size=cfg.patch_size,
                                        num_prefix_tokens=p) * len(batch)
            dist_sum = d if dist_sum is None else dist_sum + d
            n_seen += len(batch)
            take = show - sum(len(a[0]) for a in kept)
            if take > 0:
                kept.append([a[:take].cpu() for a in attns])
                if cfg.pooling in ATTENTION_POOLINGS:
                    kept_pool.append(pooling_attention(model, feats[:take]).cpu())
            bar.update(len(batch))
    return Analysis(
        preds=torch.cat(preds) if preds else None,
        confidence=torch.cat(conf) if conf else None,
        embeddings=torch.cat(embs),
        distance=dist_sum / n_seen,
        attns=[torch.cat(layer) for layer in zip(*kept)],
        pool_attn=torch.cat(kept_pool) if kept_pool else None,
    )


def image_labels(run: Run, inputs: Inputs, an: Analysis, n: int) -> list:
    return prediction_labels(run.class_names, inputs.labels[:n], an.preds, an.confidence)


def prediction_labels(class_names: list[str], labels: torch.Tensor, preds: torch.Tensor | None = None,
                      confidence: torch.Tensor | None = None) -> list:
    """An `ImageLabel` per image: "pred: cat (87%)" over "true: dog", or the true class alone without preds;
    labels -1 where unknown."""
    from vitlab.inspect.plots import ImageLabel

    out = []
    for i in range(len(labels)):
        t = int(labels[i])
        true = class_names[t] if t >= 0 else "?"
        if preds is None:
            out.append(ImageLabel(f"true: {true}"))
            continue
        k = int(preds[i])
        text = f"pred: {class_names[k]} ({100 * float(confidence[i]):.0f}%)\ntrue: {true}"
        out.append(ImageLabel(text, None if t < 0 else k == t))
    return out


def window_probe_figure(model, images: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                        step: int):
    """TensorBoard's image for a Swin (which has no rollout): the attention inside the window under the image
    centre in stage 1's first shifted block, for uint8 `images` (B, 3, S, S) and their model inputs `x`."""
    from vitlab.inspect.windows import default_block

    logits, attns = forward_with_attention(model, x)  # (B, classes), blocks x (B, nW, heads, N, N)
    confidence, preds = logits.float().softmax(-1).max(-1) if model.cfg.num_classes else (None, None)
    block = default_block(model.block_layout(), 0)
    return window_attention_figure(model, images, attns[block].cpu(), block=block, title_prefix=f"step {step}: ",
                                   labels=prediction_labels(classes, labels, preds, confidence))


class _Sections:
    """Collects (figure -> PNG in out_dir -> report section) in the order they are made."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.items: list[Section] = []

    def add(self, fig, name: str, title: str, caption: str) -> None:
        from vitlab.inspect.plots import save_figure

        self.items.append(Section(title, caption, save_figure(fig, self.out_dir / name)))


def explain_run(run: Run, inputs: Inputs | None, *, out_dir: str | Path, show: int = 6,
                batch_size: int = 64) -> ExplainResult:
    """Write the PNGs and report.html for `run` into `out_dir`; `inputs` None: weight-only views."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = list(run.notes)
    sections = _Sections(out_dir)
    an = None
    swin = is_swin(run.model)
    if inputs is not None and len(inputs.images):
        an = (analyse_swin if swin else analyse)(run, inputs, show=show, batch_size=batch_size)
        if swin:
            swin_sections(run, inputs, an, sections, image_labels(run, inputs, an, len(an.attns[0])))
        else:
            _attention_sections(run, inputs, an, sections)
    if swin:
        notes.append(LEFT_OUT)
        _patch_filter_section(run, sections)
    else:
        _weight_sections(run, sections, notes)
    if an is not None:
        _embedding_section(run, inputs, an, sections, notes)
    _run_sections(run, inputs, an, sections, notes)
    report = write_report(out_dir / "report.html", title=f"vitlab explain: {run.path.name}",
                          summary=_summary(run, inputs, an), sections=sections.items, notes=notes)
    return ExplainResult(report, [s.image for s in sections.items], notes)


def _attention_sections(run: Run, inputs: Inputs, an: Analysis, sections: _Sections) -> None:
    """Per-head and per-layer attention maps, rollout, mean attention distance."""
    from vitlab.inspect import plots

    cfg = run.model.cfg
    p, grid = run.model.num_prefix_tokens, (cfg.grid_size, cfg.grid_size)
    S, L, H = len(an.attns[0]), len(an.attns), an.attns[0].shape[1]
    imgs, labels = inputs.images[:S], image_labels(run, inputs, an, S)
    tokens = _token_words(cfg)
    query = "cls" if cfg.class_token else "patches"

    if cfg.pooling == "map":  # the query that really pools is the MAP head's
        heads, what = an.pool_attn, "MAP head attention (learned query -> final patch tokens)"
    elif cfg.pooling == "seq":  # the scores that really pool: one "head"
        heads, what = an.pool_attn, "Sequence-pooling weights (softmax scores of the final patch tokens)"
    else:
        heads = cls_attention(an.attns[-1], num_prefix_tokens=p, query=query)  # (S, H, Np)
        what = _query_words(query) + f" in the last block ({L})"
    sections.add(plots.plot_attention_grid(imgs, to_grid(heads, grid), labels=labels,
                                           col_titles=[f"head {h + 1}" for h in range(heads.shape[1])],
                                           title=f"{what}, per head"),
                 "attention_heads.png", "Attention of each head",
                 f"{what}, one column per head, overlaid on the image. {tokens}")

    per_layer = torch.stack([cls_attention(a.mean(dim=1), num_prefix_tokens=p, query=query)
                             for a in an.attns], dim=1)  # (S, L, Np)
    sections.add(plots.plot_attention_grid(imgs, to_grid(per_layer, grid), labels=labels,
                                           col_titles=[f"block {i + 1}" for i in range(L)],
                                           title=f"{_query_words(query)}, mean over {H} heads, every block"),
                 "attention_layers.png", "Attention through the layers",
                 f"{_query_words(query)}, averaged over heads, for each block from first to last. {tokens}")

    R = attention_rollout(an.attns, num_prefix_tokens=p)  # (S, N, N)
    flow = rollout_map(R, pooling=cfg.pooling, num_prefix_tokens=p, pool_attention=an.pool_attn)  # (S, Np)
    caption = ROLLOUT_CAPTIONS[cfg.pooling]
    sections.add(plots.plot_rollout(imgs, to_grid(flow, grid), labels=labels,
                                    title=f"Attention rollout ({cfg.pooling} pooling): {caption}"),
                 "attention_rollout.png", "Attention rollout",
                 f"Abnar & Zuidema (2020): mean over heads, identity added for the residual, rows renormalised, "
                 f"multiplied over all {L} blocks. Shown: {caption}. {tokens}")

    uniform = float(patch_distances(grid, cfg.patch_size).mean())
    sections.add(plots.plot_attention_distance(an.distance, patch_size=cfg.patch_size,
                                               image_size=cfg.image_size, uniform=uniform),
                 "attention_distance.png", "Mean attention distance",
                 f"For each head: the attention-weighted pixel distance between query and key patches, averaged "
                 f"over queries and {len(inputs.images)} images (ViT paper Fig. 7 right). The dashed line is "
                 "the distance a head attending uniformly to all patches would have.")


def _weight_sections(run: Run, sections: _Sections, notes: list[str]) -> None:
    """Views of the weights alone: position-embedding similarity and patch-filter components (conv stem: its
    first kernels)."""
    from vitlab.inspect import plots

    model, cfg = run.model, run.model.cfg
    if cfg.pos_embed == "none":
        notes.append("the model has no position embedding (pos_embed='none'): similarity figure skipped")
    else:
        stripped = cfg.pos_embed == "learned" and cfg.pos_embed_prefix and model.num_prefix_tokens
        sections.add(plots.plot_position_similarity(position_similarity(model), grid=(cfg.grid_size,) * 2,
                                                    kind=cfg.pos_embed),
                     "position_similarity.png", "Position embedding similarity",
                     "Cosine similarity between the position embedding of each patch position and all others "
                     "(ViT paper Fig. 7 centre)." + (" Class/register positions are left out." if stripped else ""))
    if cfg.stem == "conv":  # no patch projection to decompose: its first conv sees the pixels
        w = stem_kernels(model, k=28)
        sections.add(plots.plot_patch_filters(w, title=f"Conv stem: the {len(w)} strongest of its first "
                                              f"{model.patch_embed.convs[0].out_channels} 3x3 kernels (RGB)\n"
                                              "each tile scaled to its own min..max", tile_prefix="k"),
                     "stem_kernels.png", "Conv stem kernels",
                     "The first 3x3 convolution of the conv stem, the filters that see the pixels (as the first "
                     "layer of a CNN), strongest (L2 norm) first, each tile min-max scaled.")
        return
    _patch_filter_section(run, sections)


def _patch_filter_section(run: Run, sections: _Sections) -> None:
    """Principal components of the patch projection (a ViT's or a Swin's: both embed P x P patches with one conv)."""
    from vitlab.inspect import plots

    model, cfg = run.model, run.model.cfg
    fp = patch_filter_pca(model, k=28)
    C, P = cfg.in_channels, cfg.patch_size
    sections.add(plots.plot_patch_filters(fp.components.reshape(-1, C, P, P),
                                          explained_variance_ratio=fp.explained_variance_ratio),
                 "patch_filters.png", "Patch embedding filters",
                 f"Principal components of the {model.patch_embed.proj.out_channels} patch-projection filters "
                 f"({C}x{P}x{P}), each tile min-max scaled (ViT paper Fig. 7 left).")


def _embedding_section(run: Run, inputs: Inputs, an: Analysis, sections: _Sections, notes: list[str]) -> None:
    """Pre-logit embeddings in 2-D (PCA, and t-SNE with scikit-learn), coloured by class."""
    from vitlab.inspect import plots

    pooling = getattr(run.model.cfg, "pooling", None) or run.model.cfg.global_pool  # ViT or Swin
    known = inputs.labels >= 0
    colored_by = "true class" if bool(known.all()) else "predicted class" if an.preds is not None else None
    if len(an.embeddings) < 3 or colored_by is None:
        notes.append("embedding map skipped: needs at least 3 images with a true or predicted class")
        return
    panels = [("PCA", pca_2d(an.embeddings))]
    if not has_tsne():
        notes.append("t-SNE skipped: scikit-learn is not installed (PCA only)")
    elif len(an.embeddings) >= 5:
        panels.append(("t-SNE", tsne_2d(an.embeddings)))
    what = "Class-token embeddings" if pooling == "cls" else f"Pooled ({pooling}) embeddings"
    sections.add(plots.plot_embeddings(panels, classes=inputs.labels if colored_by == "true class" else an.preds,
                                       class_names=run.class_names, what=what, colored_by=colored_by),
                 "embeddings.png", "Embeddings", f"{what} (what the model's head sees: "
                 "`forward_head(..., pre_logits=True)`) projected to 2-D.")


def _run_sections(run: Run, inputs: Inputs | None, an: Analysis | None, sections: _Sections,
                  notes: list[str]) -> None:
    """Training curves and confusion matrix, drawn by the same functions as the trainer's figures."""
    from vitlab.inspect import plots

    num_classes = run.model.cfg.num_classes
    if run.metrics:
        sections.add(plots.plot_curves(run.metrics), "training_curves.png", "Training curves",
                     "Loss, accuracy and learning rate per epoch from metrics.jsonl.")
    cm, source = run.confusion, "eval.json"
    if cm is None and an is not None and an.preds is not None and bool((inputs.labels >= 0).all()):
        cm, source = confusion_matrix(inputs.labels, an.preds, num_classes), inputs.source
    if cm is None:
        if num_classes:
            notes.append("confusion matrix skipped: no eval.json and no true labels for the images")
        return
    acc = 100.0 * float(cm.diagonal().sum()) / max(int(cm.sum()), 1)
    where = f"eval.json ({int(cm.sum())} images)" if source == "eval.json" else source
    sections.add(plots.plot_confusion(cm, run.class_names, title=f"Confusion matrix, {where}: accuracy {acc:.1f}%"),
                 "confusion_matrix.png", "Confusion matrix", f"Rows: true class, columns: predicted class, from "
                 f"{source}; colour and numbers are the fraction of each true class.")


def _query_words(query: str) -> str:
    return "Class-token attention to each patch" if query == "cls" else \
        "Mean attention of the patch tokens to each patch (no class token)"


def _token_words(cfg) -> str:
    parts = (["class token"] if cfg.class_token else []) + \
        ([f"{cfg.reg_tokens} register tokens"] if cfg.reg_tokens else [])
    return f"The {' and '.join(parts)} are left out of the patch grid." if parts else ""


def _summary(run: Run, inputs: Inputs | None, an: Analysis | None) -> list[tuple[str, str]]:
    cfg = run.model.cfg
    rows = [("run", str(run.path))]
    if is_swin(run.model):
        rows += swin_model_rows(run.model)
    else:
        rows += [("model", f"{run.model.summary()}, MLP {cfg.mlp_dim}"),
                 ("tokens", f"{cfg.image_size}x{cfg.image_size} images, {cfg.patch_size}x{cfg.patch_size} patches "
                            f"({cfg.num_patches}), class token: {'yes' if cfg.class_token else 'no'}, "
                            f"registers: {cfg.reg_tokens}, pooling: {cfg.pooling}, positions: {cfg.pos_embed}")]
    if inputs is not None:
        rows.append(("images", f"{len(inputs.images)} ({inputs.source})"))
        known = inputs.labels >= 0
        if an is not None and an.preds is not None and bool(known.any()):
            acc = (an.preds[known] == inputs.labels[known]).float().mean().item() * 100
            rows.append(("accuracy on these images", f"{acc:.1f}% of {int(known.sum())}"))
    if run.metrics:
        last = run.metrics[-1]
        rows.append(("last epoch", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in last.items() if isinstance(v, int | float))))
    return rows
