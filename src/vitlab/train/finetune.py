"""Fine-tuning: a pretrained ViT's weights in a model for new classes and a new image size, and a linear probe.

`init_from(SRC, image_size=64, num_classes=4)` opens SRC with `vitlab.modeldir.open_model_dir` (as every command
that takes a model dir does), one of
- a vitlab model dir (config.json model_type "vitlab_vit"), or a vitlab CLIP/SigLIP dir (its vision tower);
- a Hugging Face ViT, CLIP or SigLIP dir (config.json + safetensors; CLIP/SigLIP: the vision tower);
- a timm safetensors file or dir, described by timm's config.json beside it or by a vitlab `variant`,
converts it with vitlab.convert (the same code as `vitlab convert`), and returns a VisionTransformer with the
source's architecture at the new size, plus a provenance dict for the run dir. The classifier is kept when
the class count matches, else replaced by a zero-initialised one (big_vision's head_zeroinit: the first
logits are uniform, so the first steps do not wreck the features); learned patch positions are resampled
bicubically to the new grid (timm's resample_abs_pos_embed, so the backbone computes what timm computes on
the source at that size).

A vitlab model dir of another registered family (a Swin run dir) fine-tunes the same way: new classes replace
its head; a new image size is taken only where every stage keeps its attention window, since then no weight
depends on the size (its relative-position tables have the window's shape).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.model import VisionTransformer, create_model, registry
from vitlab.model.hub import seeded
from vitlab.model.posemb import resample_grid
from vitlab.modeldir import open_model_dir
from vitlab.rundir import sha256_file
from vitlab.weights import load_into

# config fields a fine-tuning run may set besides image_size and num_classes, by family (model_type); the rest
# is the source's
TRAINING_FIELDS = ("dropout", "attn_dropout", "head_dropout", "drop_path")
FAMILY_TRAINING_FIELDS = {VisionTransformer.model_type: TRAINING_FIELDS,
                          "vitlab_swin": ("drop_rate", "attn_drop_rate", "drop_path")}
# what a linear probe zeroes: the backbone's dropouts and drop path (not the head's dropout)
BACKBONE_DROPOUTS = {VisionTransformer.model_type: ("dropout", "attn_dropout", "drop_path"),
                     "vitlab_swin": ("attn_drop_rate", "drop_path")}
HEAD_PREFIXES = ("head.", "head_dist.")  # a Swin's classifier is head.fc


def load_source(src: str | Path, *, variant: str | None = None) -> tuple[nn.Module, dict]:
    """The pretrained transformer (a ViT, or a registry family such as Swin) in SRC, opened by
    `vitlab.modeldir.open_model_dir` as every command opens a model, and
    {"source", "kind", "files": {file name: sha256}, "variant"} describing it."""
    path = Path(src).expanduser()
    md = open_model_dir(path, variant=variant, tokenizer=False)
    model = md.model.vision if md.is_clip else md.model  # CLIP / SigLIP: the image tower
    if type(model) not in registry.MODEL_CLASSES.values():
        raise VitlabError(f"{path} holds a {md.what}; fine-tuning starts from a transformer (a vitlab ViT or Swin, "
                          "Hugging Face ViT / Swin / CLIP / SigLIP, or timm)")
    provenance = {"source": str(path.resolve()), "kind": md.origin,
                  "files": {f.name: sha256_file(f) for f in md.files}, "variant": variant}
    return model.float().eval(), provenance


def init_from(src: str | Path, *, image_size: int, num_classes: int, variant: str | None = None,
              seed: int | None = 0, linear_probe: bool = False, **overrides) -> tuple[nn.Module, dict]:
    """(model with SRC's weights for `num_classes` classes at `image_size`, provenance for the run dir).

    `overrides`: training-only fields (a ViT's dropout, attn_dropout, head_dropout, drop_path; a Swin's
    drop_rate, attn_drop_rate, drop_path); the architecture is the source's. `linear_probe`: the backbone's
    dropouts and drop path are 0, so its features stay the source's. `seed` seeds what is newly initialised
    (nothing but the head's zeros today, kept for determinism if that changes). Provenance records the source,
    its kind, the sha256 of each weights file, the source's size and classes, and which tensors were replaced,
    resampled or dropped.
    """
    source, provenance = load_source(src, variant=variant)
    fields = FAMILY_TRAINING_FIELDS[source.model_type]
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise VitlabError(f"fine-tuning keeps the source's architecture; only {', '.join(fields)} can be "
                          f"changed, not {', '.join(bad)}")
    if linear_probe:
        overrides.update(dict.fromkeys(BACKBONE_DROPOUTS[source.model_type], 0.0))
    old = source.cfg
    cfg = dataclasses.replace(old, image_size=image_size, num_classes=num_classes, **overrides)  # validates
    check_windows(old, cfg, src)
    with seeded(seed):
        model = create_model(cfg)
    state, target = source.state_dict(), model.state_dict()
    keep_head = num_classes == old.num_classes
    out, replaced, resampled = {}, [], {}
    for key, ours in target.items():
        if key.startswith(HEAD_PREFIXES) and not keep_head:
            out[key] = torch.zeros_like(ours)
            replaced.append(key)
        elif key == "pos_embed" and state[key].shape != ours.shape:
            n_pre = source.num_prefix_tokens if old.pos_embed_prefix else 0
            pe = state[key]  # (1, prefix + old grid^2, D)
            patches = resample_grid(pe[:, n_pre:], (old.grid_size,) * 2, (cfg.grid_size,) * 2)
            out[key] = torch.cat([pe[:, :n_pre], patches], dim=1)
            resampled[key] = {"from": [old.grid_size] * 2, "to": [cfg.grid_size] * 2}
        else:
            out[key] = state[key]
    load_into(model, out, source=f"weights of {provenance['source']}")
    provenance.update(source_image_size=old.image_size, source_num_classes=old.num_classes,
                      image_size=image_size, num_classes=num_classes, head="kept" if keep_head else "replaced",
                      replaced=replaced, resampled=resampled, dropped=sorted(set(state) - set(target)))
    return model, provenance


def check_windows(old, new, src: str | Path) -> None:
    """A Swin at another image size keeps its weights only if every stage keeps its window (the relative-position
    tables are (2 * window - 1)^2 rows); one line naming the sizes that do otherwise."""
    if getattr(old, "stage_windows", None) is None or old.image_size == new.image_size:
        return
    windows, now = [w for w, _ in old.stage_windows], [w for w, _ in new.stage_windows]
    if now != windows:
        raise VitlabError(f"--init {src}: this Swin learned its per-stage attention windows {windows} at "
                          f"{old.image_size} px; at {new.image_size} px they would be {now}: fine-tune it at "
                          f"{old.image_size} px, or at a size that keeps those windows")


def freeze_backbone(model: nn.Module) -> list[str]:
    """Linear probe: only the classifier (head, and DeiT's head_dist) keeps requires_grad; returns its names.

    `create_optimizer` then optimises the head alone. The backbone's dropout / drop path still run in
    training mode, so a probe should set them to 0 (init_from(..., drop_path=0.0)).
    """
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIXES))
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise VitlabError("a linear probe needs a classifier head: the model has num_classes=0")
    return trainable


def init_model(config, *, image_size: int, num_classes: int) -> tuple[nn.Module, dict]:
    """The model a fine-tuning run (`config.init`, a TrainConfig) starts from, and its provenance.

    drop_path and `model_args` (training fields only) apply to it; with `freeze_backbone` (a linear probe) only
    the classifier trains and the backbone's dropout and drop path are 0, so its features stay the source's.
    """
    overrides = {"drop_path": config.drop_path, **config.model_args}
    model, provenance = init_from(config.init, image_size=image_size, num_classes=num_classes,
                                  variant=config.variant or None, seed=config.seed,
                                  linear_probe=config.freeze_backbone, **overrides)
    if config.freeze_backbone:
        provenance["trainable"] = freeze_backbone(model)
    return model, provenance
