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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.model import VisionTransformer
from vitlab.model.hub import seeded
from vitlab.model.posemb import resample_grid
from vitlab.modeldir import open_model_dir
from vitlab.rundir import sha256_file
from vitlab.weights import load_into

# config fields a fine-tuning run may set besides image_size and num_classes; the rest is the source's
TRAINING_FIELDS = ("dropout", "attn_dropout", "head_dropout", "drop_path")
HEAD_PREFIXES = ("head.", "head_dist.")


def load_source(src: str | Path, *, variant: str | None = None) -> tuple[VisionTransformer, dict]:
    """The pretrained ViT in SRC (opened by `vitlab.modeldir.open_model_dir`, as every command opens a model) and
    {"source", "kind", "files": {file name: sha256}, "variant"} describing it."""
    path = Path(src).expanduser()
    md = open_model_dir(path, variant=variant, tokenizer=False)
    model = md.model.vision if md.is_clip else md.model  # CLIP / SigLIP: the image tower
    if not isinstance(model, VisionTransformer):
        raise VitlabError(f"{path} holds a {md.what}; fine-tuning starts from a ViT (vitlab, Hugging Face ViT / "
                          "CLIP / SigLIP, or timm)")
    provenance = {"source": str(path.resolve()), "kind": md.origin,
                  "files": {f.name: sha256_file(f) for f in md.files}, "variant": variant}
    return model.float().eval(), provenance


def init_from(src: str | Path, *, image_size: int, num_classes: int, variant: str | None = None,
              seed: int | None = 0, **overrides) -> tuple[VisionTransformer, dict]:
    """(model with SRC's weights for `num_classes` classes at `image_size`, provenance for the run dir).

    `overrides`: training-only fields (dropout, attn_dropout, head_dropout, drop_path); the architecture is
    the source's. `seed` seeds what is newly initialised (nothing but the head's zeros today, kept for
    determinism if that changes). Provenance records the source, its kind, the sha256 of each weights file,
    the source's size and classes, and which tensors were replaced, resampled or dropped.
    """
    source, provenance = load_source(src, variant=variant)
    bad = sorted(set(overrides) - set(TRAINING_FIELDS))
    if bad:
        raise VitlabError(f"fine-tuning keeps the source's architecture; only {', '.join(TRAINING_FIELDS)} can be "
                          f"changed, not {', '.join(bad)}")
    old = source.cfg
    cfg = dataclasses.replace(old, image_size=image_size, num_classes=num_classes, **overrides)  # validates
    with seeded(seed):
        model = VisionTransformer(cfg)
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


def init_model(config, *, image_size: int, num_classes: int) -> tuple[VisionTransformer, dict]:
    """The model a fine-tuning run (`config.init`, a TrainConfig) starts from, and its provenance.

    drop_path and `model_args` (training fields only) apply to it; with `freeze_backbone` (a linear probe) only
    the classifier trains and the backbone's dropout and drop path are 0, so its features stay the source's.
    """
    overrides = {"drop_path": config.drop_path, **config.model_args}
    if config.freeze_backbone:
        overrides.update(drop_path=0.0, dropout=0.0, attn_dropout=0.0)
    model, provenance = init_from(config.init, image_size=image_size, num_classes=num_classes,
                                  variant=config.variant or None, seed=config.seed, **overrides)
    if config.freeze_backbone:
        provenance["trainable"] = freeze_backbone(model)
    return model, provenance
