"""Hugging Face transformers ViT (`ViTModel`, `ViTForImageClassification`) -> vitlab.

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
"""

from __future__ import annotations

import re

import torch

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer
from vitlab.weights import describe_mismatch, load_into

# HF hidden_act -> ours. gelu_new is the tanh approximation written out (same function).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "quick_gelu": "quick_gelu"}
# transformers' ViTConfig defaults, for hub configs that leave fields out.
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                    pooler_act="tanh")

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_WB = r"\.(weight|bias)$"
# (HF key pattern after dropping "vit.", our key). Either spelling of each block parameter.
_RENAMES = [(re.compile(p), ours) for p, ours in (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection" + _WB, r"patch_embed.proj.\1"),
    (r"^" + _LAYER + r"layernorm_before" + _WB, r"blocks.\1.norm1.\2"),
    (r"^" + _LAYER + r"layernorm_after" + _WB, r"blocks.\1.norm2.\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense" + _WB, r"blocks.\1.attn.proj.\2"),
    (r"^layers\.(\d+)\.attention\.o_proj" + _WB, r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense" + _WB, r"blocks.\1.mlp.fc1.\2"),
    (r"^layers\.(\d+)\.mlp\.fc1" + _WB, r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.output\.dense" + _WB, r"blocks.\1.mlp.fc2.\2"),
    (r"^layers\.(\d+)\.mlp\.fc2" + _WB, r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm" + _WB, r"norm.\1"),
    (r"^pooler\.dense" + _WB, r"pre_logits.\1"),
    (r"^classifier" + _WB, r"head.\1"),
)]
_QKV = re.compile(r"^(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)"
                  r"|layers\.(\d+)\.attention\.([qkv])_proj)\.(weight|bias)$")
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


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
    state = {k.removeprefix("vit."): v for k, v in state.items()}
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
        k = key.removeprefix("vit.")
        if m := _QKV.match(k):
            layer = m[1] or m[3]
            parts = qkv.setdefault((layer, m[5]), {})
            idx = _QKV_ORDER[m[2] or m[4]]
            if idx in parts:
                problems.append(f"two keys for one projection (both spellings?): {parts[idx][0]}, {key}")
            parts[idx] = (key, value)
            continue
        for pat, ours in _RENAMES:
            if pat.match(k):
                name = pat.sub(ours, k)
                if name in out:
                    problems.append(f"two keys map to {name} (both key spellings present?): {key}")
                out[name] = value
                break
        else:
            unmapped.append(key)
    for (layer, kind), parts in sorted(qkv.items()):
        name = f"blocks.{layer}.attn.qkv.{kind}"
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
