"""Hugging Face transformers ViT (`ViTModel`, `ViTForImageClassification`) <-> vitlab.

The mapping works on state dicts, so it serves a live model and a hub directory
(`config.json` + `model.safetensors`) alike. Two spellings of the keys are accepted:

    hub files (what save_pretrained writes)          transformers 5, in memory
    encoder.layer.i.attention.attention.query/key/value  layers.i.attention.q_proj/k_proj/v_proj
    encoder.layer.i.attention.output.dense            layers.i.attention.o_proj
    encoder.layer.i.intermediate.dense / output.dense layers.i.mlp.fc1 / fc2

optionally under a `vit.` prefix (ViTForImageClassification). Query, key and value are stacked
into our fused `qkv`. The pooler (ViTModel: Linear + tanh on the class token) becomes
`pre_logits`, the classifier becomes `head`. Every key must be used and every parameter filled.

HF position embeddings always cover the class token. At sizes other than the configured one HF
interpolates them differently from timm/vitlab, so outputs match at the configured size only.

`to_hf_vit` goes the other way with the same name table (hub spelling); what HF's ViT cannot
express (registers, MAP head, LayerScale, ...) is an error naming the feature.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer
from vitlab.weights import describe_mismatch, load_into

# HF hidden_act -> ours. gelu_new is the tanh approximation written out (same function).
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "quick_gelu": "quick_gelu"}
_TO_HF_ACTIVATIONS = {ours: hf for hf, ours in reversed(_ACTIVATIONS.items())}  # the first HF name of each
# transformers' ViTConfig defaults, for hub configs that leave fields out.
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                    pooler_act="tanh")

# (name in hub files, name in transformers 5 in memory or None, our name); {i}: block, {p}: weight | bias.
# One table read both ways: HF -> vitlab (either spelling) and vitlab -> HF (hub spelling).
_NAMES = (
    ("embeddings.cls_token", None, "cls_token"),
    ("embeddings.position_embeddings", None, "pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", None, "patch_embed.proj.{p}"),
    ("encoder.layer.{i}.layernorm_before.{p}", "layers.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layer.{i}.layernorm_after.{p}", "layers.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attention.o_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "layers.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("layernorm.{p}", None, "norm.{p}"),
    ("pooler.dense.{p}", None, "pre_logits.{p}"),
    ("classifier.{p}", None, "head.{p}"),
)
# Query, key and value: three HF projections, one fused `qkv` here (stacked in that order).
_QKV_HUB, _QKV_PARTS_HUB = "encoder.layer.{i}.attention.attention.{part}.{p}", ("query", "key", "value")
_QKV_MEM, _QKV_PARTS_MEM = "layers.{i}.attention.{part}_proj.{p}", ("q", "k", "v")
_QKV_OURS = "blocks.{i}.attn.qkv.{p}"
_PREFIX = "vit."  # ViTForImageClassification files hold the encoder under vit.; the classifier stays at the top


def _pattern(template: str, parts: tuple[str, ...] = ()) -> re.Pattern:
    """A regex for a name template: {i} a block index, {p} weight or bias, {part} one of `parts`."""
    groups = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "part": f"(?P<part>{'|'.join(parts)})"}
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: groups[m[1]], re.escape(template)) + "$")


# (HF pattern, our template) for either spelling; (HF pattern, its q/k/v part names) for the projections
_RENAMES = [(_pattern(hf), ours) for hub, mem, ours in _NAMES for hf in (hub, mem) if hf]
_QKV = [(_pattern(_QKV_HUB, _QKV_PARTS_HUB), _QKV_PARTS_HUB), (_pattern(_QKV_MEM, _QKV_PARTS_MEM), _QKV_PARTS_MEM)]
_TO_HF = [(_pattern(ours), hub) for hub, _, ours in _NAMES]
_QKV_OURS_PATTERN = _pattern(_QKV_OURS)


def hf_vit_config(hf_config: dict, state: dict[str, torch.Tensor]) -> ViTConfig:
    """Our ViTConfig for an HF ViT config dict; head sizes come from which weights are present."""
    model_type = hf_config.get("model_type", "vit")
    if model_type != "vit":
        raise VitlabError(f"config model_type {model_type!r} is not a plain ViT (expected 'vit')")
    c = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    act = c["hidden_act"]
    if act not in _ACTIVATIONS:
        raise VitlabError(f"hidden_act {act!r} has no vitlab equivalent; supported: {sorted(_ACTIVATIONS)}")
    sizes = {}
    for k in ("image_size", "patch_size"):
        v = c[k]
        if isinstance(v, list | tuple):
            if len(set(v)) != 1:
                raise VitlabError(f"{k}={v}: vitlab's ViT takes square images and patches")
            v = v[0]
        sizes[k] = int(v)
    D, H = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, D // H):
        raise VitlabError(f"head_dim={c['head_dim']} differs from hidden_size/num_attention_heads={D // H}")
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    pre_logits = 0
    if "pooler.dense.weight" in state:
        if c["pooler_act"] != "tanh":
            raise VitlabError(f"pooler_act {c['pooler_act']!r}: vitlab's pre-logits layer uses tanh")
        pre_logits = int(state["pooler.dense.weight"].shape[0])
    num_classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    return ViTConfig(
        image_size=sizes["image_size"], patch_size=sizes["patch_size"], in_channels=int(c["num_channels"]),
        num_classes=num_classes, width=D, depth=int(c["num_hidden_layers"]), heads=H,
        mlp_dim=int(c["intermediate_size"]), qkv_bias=bool(c["qkv_bias"]), pos_embed="learned",
        pos_embed_prefix=True, class_token=True, reg_tokens=0, pooling="cls",
        dropout=float(c["hidden_dropout_prob"]), attn_dropout=float(c["attention_probs_dropout_prob"]),
        norm_eps=float(c["layer_norm_eps"]), activation=_ACTIVATIONS[act], pre_norm=False, final_norm=True,
        fc_norm=False, patch_bias=True, pre_logits_dim=pre_logits,
        name=str(hf_config.get("_name_or_path") or ""),
    )


def hf_vit_state_to_vitlab(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an HF ViT state dict to ours; returns (our state, problems: unmapped/duplicate/qkv issues)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, tuple[str, torch.Tensor]]] = {}  # (layer, weight|bias) -> parts
    unmapped, problems = [], []
    for key, value in state.items():
        k = key.removeprefix(_PREFIX)
        if hit := next(((m, names) for pat, names in _QKV if (m := pat.match(k))), None):
            m, names = hit
            parts = qkv.setdefault((m["i"], m["p"]), {})
            idx = names.index(m["part"])
            if idx in parts:
                problems.append(f"two keys for one projection (both spellings?): {parts[idx][0]}, {key}")
            parts[idx] = (key, value)
            continue
        for pat, ours in _RENAMES:
            if m := pat.match(k):
                name = ours.format(**m.groupdict())
                if name in out:
                    problems.append(f"two keys map to {name} (both key spellings present?): {key}")
                out[name] = value
                break
        else:
            unmapped.append(key)
    for (layer, kind), parts in sorted(qkv.items()):
        name = _QKV_OURS.format(i=layer, p=kind)
        if len(parts) != 3:
            have = [parts[i][0] for i in sorted(parts)]
            problems.append(f"{name} needs query, key and value {kind}s; found only {have}")
            continue
        shapes = {tuple(parts[i][1].shape) for i in range(3)}
        if len(shapes) != 1:
            problems.append(f"{name}: query/key/value shapes differ: "
                            + ", ".join(f"{parts[i][0]} {tuple(parts[i][1].shape)}" for i in range(3)))
            continue
        out[name] = torch.cat([parts[i][1] for i in range(3)], dim=0)  # (3D, D) or (3D,), q|k|v order
    if unmapped:
        problems.insert(0, f"unmapped keys: {', '.join(sorted(unmapped))}")
    return out, problems


def from_hf_vit_state_dict(state: dict[str, torch.Tensor], hf_config: dict) -> VisionTransformer:
    """Our model from an HF ViT state dict (either key spelling) and its config dict (config.json)."""
    cfg = hf_vit_config(hf_config, state)
    model = VisionTransformer(cfg)
    ours, problems = hf_vit_state_to_vitlab(state)
    mismatch = describe_mismatch(model.state_dict(), ours)
    if mismatch:
        problems.append(f"{mismatch} (vitlab names)")
    if problems:
        raise VitlabError("Hugging Face ViT weights do not match the config: " + "; ".join(problems))
    return load_into(model, ours, source="Hugging Face ViT weights").eval()


def from_hf_vit(hf_model: torch.nn.Module) -> VisionTransformer:
    """A vitlab model with the outputs of a transformers `ViTModel` or `ViTForImageClassification`.

    ViTModel: our `forward_features` = `last_hidden_state`, `forward_head` = `pooler_output` (tanh
    pre-logits, num_classes 0). ViTForImageClassification: our logits = its logits.
    """
    name = type(hf_model).__name__
    if name not in ("ViTModel", "ViTForImageClassification"):
        raise VitlabError(f"from_hf_vit converts ViTModel and ViTForImageClassification; got {name}")
    return from_hf_vit_state_dict(hf_model.state_dict(), hf_model.config.to_dict())


# ---- vitlab -> HF --------------------------------------------------------------------------------
# What transformers' ViT cannot hold, by our (effective) config field, in words for the error message.
_NO_HF_EQUIVALENT = {
    "stem": "a convolutional stem", "class_token": "a model without a class token",
    "reg_tokens": "register tokens", "distill_token": "a distillation token (DeiT)",
    "pooling": {"gap": "global average pooling", "map": "a MAP (attention pooling) head",
                "seq": "sequence pooling"},
    "layerscale_init": "LayerScale", "pre_norm": "a LayerNorm before the encoder",
    "final_norm": "a model without a final LayerNorm", "fc_norm": "a LayerNorm after pooling (fc_norm)",
    "patch_bias": "a patch embedding without bias",
}


def describe_feature(field: str, value) -> str:
    words = _NO_HF_EQUIVALENT.get(field, field)
    words = words.get(value, field) if isinstance(words, dict) else words
    return f"{words} ({field}={value!r})"


def effective_fields(cfg: ViTConfig) -> dict:
    """The config's fields as the model uses them: automatic flags resolved, the informative name dropped."""
    d = dataclasses.asdict(cfg)
    del d["name"]
    d.update(fc_norm=cfg.use_fc_norm, patch_bias=cfg.use_patch_bias)
    return d


def vitlab_state_to_hf_vit(state: dict[str, torch.Tensor], *, prefix: str = _PREFIX
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict in HF hub spelling (encoder under `prefix`, classifier at the top); also our unmapped keys."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if m := _QKV_OURS_PATTERN.match(key):
            for part, t in zip(_QKV_PARTS_HUB, value.chunk(3, dim=0)):  # own storage: safetensors refuses views
                out[prefix + _QKV_HUB.format(i=m["i"], part=part, p=m["p"])] = t.clone()
            continue
        hit = next(((m, hub) for pat, hub in _TO_HF if (m := pat.match(key))), None)
        if hit is None:
            unmapped.append(key)
            continue
        name = hit[1].format(**hit[0].groupdict())
        out[name if name.startswith("classifier.") else prefix + name] = value
    return out, unmapped


def to_hf_vit(model: VisionTransformer, *, class_names: list[str] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in hub spelling, config.json dict) of the transformers ViT with this model's outputs.

    ViTForImageClassification (num_classes 0: its "logits" are the class token's features, as ours), or
    ViTModel with its tanh pooler for a model with a pre-logits layer and no classifier. Sin-cos, absent or
    patch-only positions become HF's learned table with zeros at the class token (the same sums).
    Stochastic depth and head dropout (training only; HF's ViT has neither) are dropped. Anything else
    HF's ViT cannot express raises a VitlabError naming the feature.
    """
    cfg = model.cfg
    if cfg.pre_logits_dim and cfg.num_classes:
        raise VitlabError("a tanh pre-logits layer before a classifier: transformers' ViTForImageClassification "
                          "has no pooler and ViTModel no classifier")
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]  # transformers' placeholders
    if len(names) != cfg.num_classes:
        raise VitlabError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
    hf_config = {
        "architectures": ["ViTModel" if cfg.pre_logits_dim else "ViTForImageClassification"], "model_type": "vit",
        "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": _TO_HF_ACTIVATIONS[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.in_channels, "qkv_bias": cfg.qkv_bias, "pooler_act": "tanh",
        "pooler_output_size": cfg.pre_logits_dim or cfg.width,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    state = dict(model.state_dict())
    positions = {}
    if cfg.pos_embed != "learned" or not cfg.pos_embed_prefix:  # HF's table covers the class token too
        positions = dict(pos_embed="learned", pos_embed_prefix=True)
        patches = torch.zeros(1, cfg.num_patches, cfg.width) if model.pos_embed is None else \
            model.pos_embed.detach()  # (1, N, D): sin-cos and patch-only tables cover the patches alone
        state["pos_embed"] = torch.cat([patches.new_zeros(1, cfg.num_prefix_tokens, cfg.width), patches], dim=1)
    hf_state, unmapped = vitlab_state_to_hf_vit(state, prefix="" if cfg.pre_logits_dim else _PREFIX)
    # Read the config back with the importer: whatever does not come back, HF's ViT cannot express.
    back = effective_fields(hf_vit_config(hf_config, hf_state))
    want = effective_fields(dataclasses.replace(cfg, drop_path=0.0, head_dropout=0.0, **positions))
    lost = [describe_feature(k, v) for k, v in want.items() if back[k] != v]
    if lost:
        raise VitlabError("transformers' ViT cannot express " + "; ".join(lost))
    if unmapped:  # every config difference is caught above, so this is a gap in the name table
        raise RuntimeError(f"no Hugging Face name for {unmapped}")
    return hf_state, hf_config
