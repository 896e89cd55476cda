"""Fine-tuning: a pretrained ViT's weights in a model for new classes and a new image size, and a linear probe.

`init_from(SRC, image_size=64, num_classes=4)` reads SRC, one of
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
from vitlab.model import VisionTransformer, create_model, load_pretrained, registry
from vitlab.model.hub import seeded
from vitlab.model.posemb import resample_grid
from vitlab.rundir import sha256_file
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, load_into, read_json

# config fields a fine-tuning run may set besides image_size and num_classes, by family (model_type); the rest
# is the source's
TRAINING_FIELDS = ("dropout", "attn_dropout", "head_dropout", "drop_path")
FAMILY_TRAINING_FIELDS = {VisionTransformer.model_type: TRAINING_FIELDS,
                          "vitlab_swin": ("drop_rate", "attn_drop_rate", "drop_path")}
# what a linear probe zeroes: the backbone's dropouts and drop path (not the head's dropout)
BACKBONE_DROPOUTS = {VisionTransformer.model_type: ("dropout", "attn_dropout", "drop_path"),
                     "vitlab_swin": ("attn_drop_rate", "drop_path")}
HEAD_PREFIXES = ("head.", "head_dist.")  # a Swin's classifier is head.fc


def load_source(src: str | Path, *, variant: str | None = None) -> tuple[VisionTransformer, dict]:
    """The pretrained ViT in SRC and {"source", "kind", "files": {file name: sha256}} describing it."""
    from vitlab.clip.model import MODEL_TYPE as CLIP_TYPE
    from vitlab.clip.model import CLIPModel
    from vitlab.convert.files import convert_timm, locate, read_weights  # the `vitlab convert` readers
    from vitlab.convert.hf_clip import _MODEL_TYPES as HF_CLIP_TYPES
    from vitlab.convert.hf_clip import convert_hf_clip
    from vitlab.convert.hf_vit import from_hf_vit_state_dict

    path = Path(src).expanduser()
    files, config = locate(path)
    config = config or {}
    model_type = config.get("model_type")
    if variant is not None and model_type is not None:
        raise VitlabError(f"{path}: its config.json describes the model (model_type {model_type!r}); drop --variant")
    folder = files[0].parent
    if model_type == VisionTransformer.model_type:
        model, kind = VisionTransformer.from_pretrained(folder), "vitlab"
    elif model_type == CLIP_TYPE:
        model, kind = CLIPModel.from_pretrained(folder).vision, "vitlab_clip"
    elif model_type == "vit":
        model, kind = from_hf_vit_state_dict(read_weights(files), config), "hf_vit"
    elif model_type in HF_CLIP_TYPES:
        model, kind = convert_hf_clip(read_weights(files), config), "hf_clip"
        model = model.vision if isinstance(model, CLIPModel) else model
    elif model_type is None and (variant or config.get("architecture")):
        model, kind = convert_timm(read_weights(files), config, variant=variant)[0], "timm"
    elif model_type is None:
        raise VitlabError(f"{path}: no config.json describing the weights; for a bare timm file pass its "
                          "vitlab variant (--variant Ti/16)")
    else:
        raise VitlabError(f"{folder / 'config.json'}: model_type {model_type!r} is not a ViT vitlab can fine-tune "
                          "(vitlab, Hugging Face ViT / CLIP / SigLIP, or timm)")
    provenance = {"source": str(path.resolve()), "kind": kind,
                  "files": {f.name: sha256_file(f) for f in files}, "variant": variant}
    return model.float().eval(), provenance


def load_family_source(src: str | Path, *, variant: str | None = None) -> tuple[nn.Module, dict]:
    """`load_source`, and a vitlab model dir of the registry's other families (a Swin run dir) by its model_type."""
    path = Path(src).expanduser()
    config = path / CONFIG_NAME
    model_type = read_json(config).get("model_type") if config.is_file() else None
    if model_type not in registry.MODEL_CLASSES or model_type == VisionTransformer.model_type:
        return load_source(src, variant=variant)
    if variant is not None:
        raise VitlabError(f"{path}: its config.json describes the model (model_type {model_type!r}); drop --variant")
    provenance = {"source": str(path.resolve()), "kind": "vitlab",
                  "files": {WEIGHTS_NAME: sha256_file(path / WEIGHTS_NAME)}, "variant": None}
    return load_pretrained(path).float().eval(), provenance


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
    source, provenance = load_family_source(src, variant=variant)
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
