"""Hugging Face CLIP / SigLIP <-> vitlab, on state dicts and config dicts (so a hub directory converts too).

Supported: `CLIPModel`, `CLIPVisionModel`, `SiglipModel`, `SiglipVisionModel` (hub files and transformers-5
in-memory names; vision-only checkpoints with or without the `vision_model.` prefix). Whole models become a
`CLIPModel`/`SigLIPModel`, vision-only ones a `VisionTransformer` (num_classes=0) whose output is HF's
`pooler_output`. Every HF tensor must be used and every vitlab tensor filled, or a VitlabError lists them.

Per encoder layer: layer_norm1/2 -> norm1/2, self_attn.{q,k,v}_proj -> attn.qkv (concatenated in that
order), self_attn.out_proj -> attn.proj, mlp.fc1/fc2 -> mlp.fc1/fc2. One plan of names (`_plan`) serves
both directions: `to_hf_clip` writes a whole vitlab CLIP / SigLIP model as HF's CLIPModel / SiglipModel.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.losses import MAX_CLIP_SCALE
from vitlab.clip.model import CLIPModel, create_clip
from vitlab.convert.hf_vit import describe_feature, effective_fields
from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, load_into, load_state_dict, read_json

# transformers 5.x config defaults (a config.json may omit any field equal to its default).
_DEFAULTS = {
    "clip_text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407),
    "clip_vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "clip": dict(projection_dim=512, logit_scale_init_value=2.6592),
    "siglip_text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6, eos_token_id=49407, projection_size=None),
    "siglip_vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6, vision_use_head=True),
}
# HF activation names -> ours (only exact equivalents: gelu_new is the same tanh formula).
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# architecture -> (family, tower(s))
_ARCHS = {"CLIPModel": ("clip", "both"), "CLIPVisionModel": ("clip", "vision"),
          "SiglipModel": ("siglip", "both"), "SiglipVisionModel": ("siglip", "vision")}
_MODEL_TYPES = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipModel",
                "siglip_vision_model": "SiglipVisionModel"}


# ---- configs --------------------------------------------------------------------------------------------
def _getter(d: dict, defaults: str):
    def get(key: str):
        return d[key] if d.get(key) is not None else _DEFAULTS[defaults][key]
    return get


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise VitlabError(f"hidden_act {name!r} has no exact vitlab equivalent; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise VitlabError(f"non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def vision_config_from_hf(d: dict, family: str) -> ViTConfig:
    """ViTConfig of a CLIP / SigLIP vision tower from its HF config dict."""
    get = _getter(d, f"{family}_vision")
    common = dict(image_size=_square(get("image_size"), "image_size"),
                  patch_size=_square(get("patch_size"), "patch_size"), in_channels=get("num_channels"),
                  num_classes=0, width=get("hidden_size"), depth=get("num_hidden_layers"),
                  heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"), qkv_bias=True,
                  pos_embed="learned", norm_eps=get("layer_norm_eps"), activation=_activation(get("hidden_act")))
    if family == "clip":  # class token, LN before the encoder, LN on the pooled class token only, no conv bias
        return ViTConfig(**common, class_token=True, pooling="cls", pre_norm=True, final_norm=True, fc_norm=True,
                         patch_bias=False)
    # SigLIP: no class token, LN over all tokens, then the MAP head (or, without it, plain features + mean)
    use_head = get("vision_use_head")
    return ViTConfig(**common, class_token=False, pooling="map" if use_head else "gap", pre_norm=False,
                     final_norm=True, fc_norm=False, patch_bias=True)


def text_config_from_hf(d: dict, family: str) -> TextConfig:
    get = _getter(d, f"{family}_text")
    eos = get("eos_token_id")
    if isinstance(eos, list):
        raise VitlabError(f"a list of eos_token_id ({eos}) is not supported")
    if family == "clip":  # transformers keeps argmax pooling for configs with the pre-2023 eos id 2
        pooling, causal = ("argmax" if eos == 2 else "eos"), True
    else:
        pooling, causal = "last", False
    return TextConfig(vocab_size=get("vocab_size"), context_length=get("max_position_embeddings"),
                      width=get("hidden_size"), depth=get("num_hidden_layers"), heads=get("num_attention_heads"),
                      mlp_dim=get("intermediate_size"), qkv_bias=True, norm_eps=get("layer_norm_eps"),
                      activation=_activation(get("hidden_act")), causal=causal, pooling=pooling, eos_token_id=eos)


def clip_config_from_hf(d: dict, family: str) -> CLIPConfig:
    """CLIPConfig of a whole HF CLIPModel / SiglipModel config dict."""
    vd = d.get("vision_config") or d.get("vision_config_dict") or {}
    td = d.get("text_config") or d.get("text_config_dict") or {}
    vision, text = vision_config_from_hf(vd, family), text_config_from_hf(td, family)
    if family == "clip":
        return CLIPConfig(vision=vision, text=text, kind="clip", embed_dim=_getter(d, "clip")("projection_dim"))
    if vision.pooling != "map":
        raise VitlabError("a SiglipModel without the vision MAP head (vision_use_head=False) has no image embedding")
    proj = td.get("projection_size") or text.width
    if proj != vision.width:
        raise VitlabError(f"SigLIP text projection size {proj} differs from the vision width {vision.width}")
    return CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=vision.width)


# ---- state dicts: one plan of (our names, HF names), applied in either direction --------------------------
@dataclasses.dataclass(frozen=True)
class _Pair:
    """Our tensor(s) and HF's tensor(s) holding the same numbers, each side stacked along dim 0 in order.

    q, k, v projections: one fused qkv here, three in HF. MAP head: q and kv here, one packed in_proj in HF.
    hf_shape: HF's shape where it differs from ours (ours comes from the model being filled).
    """

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    hf_shape: tuple[int, ...] | None = None


def _same(ours: str, theirs: str, params: tuple[str, ...] = ("weight", "bias")) -> list[_Pair]:
    return [_Pair((f"{ours}.{p}",), (f"{theirs}.{p}",)) for p in params]


def _encoder(theirs: str, ours: str, depth: int) -> list[_Pair]:
    plan = []
    for i in range(depth):
        h, o = f"{theirs}encoder.layers.{i}.", f"{ours}blocks.{i}."
        for hn, on in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            plan += _same(o + on, h + hn)
        for p in ("weight", "bias"):  # (3D, D) / (3D,), q then k then v
            plan.append(_Pair((f"{o}attn.qkv.{p}",), tuple(f"{h}self_attn.{n}_proj.{p}" for n in "qkv")))
    return plan


def _vision(cfg: ViTConfig, family: str, theirs: str, ours: str) -> list[_Pair]:
    D = cfg.width
    e = f"{theirs}embeddings."
    plan = _same(f"{ours}patch_embed.proj", f"{e}patch_embedding",
                 ("weight", "bias") if cfg.use_patch_bias else ("weight",))
    plan.append(_Pair((f"{ours}pos_embed",), (f"{e}position_embedding.weight",), (-1, D)))
    plan += _encoder(theirs, ours, cfg.depth)
    if family == "clip":
        plan.append(_Pair((f"{ours}cls_token",), (f"{e}class_embedding",), (D,)))
        return plan + _same(f"{ours}norm_pre", f"{theirs}pre_layrnorm") + \
            _same(f"{ours}fc_norm", f"{theirs}post_layernorm")
    plan += _same(f"{ours}norm", f"{theirs}post_layernorm")
    if cfg.pooling != "map":
        return plan
    h, o = f"{theirs}head.", f"{ours}attn_pool."
    plan.append(_Pair((f"{o}latent",), (f"{h}probe",)))
    for p in ("weight", "bias"):  # nn.MultiheadAttention packs q, k, v: q -> our q, (k, v) -> our kv
        plan.append(_Pair((f"{o}q.{p}", f"{o}kv.{p}"), (f"{h}attention.in_proj_{p}",)))
    return plan + _same(f"{o}proj", f"{h}attention.out_proj") + _same(f"{o}norm", f"{h}layernorm") + \
        _same(f"{o}mlp.fc1", f"{h}mlp.fc1") + _same(f"{o}mlp.fc2", f"{h}mlp.fc2")


def _text(cfg: TextConfig, family: str) -> list[_Pair]:
    t = "text_model."
    plan = [_Pair(("text.token_embedding.weight",), (f"{t}embeddings.token_embedding.weight",)),
            _Pair(("text.pos_embed",), (f"{t}embeddings.position_embedding.weight",), (-1, cfg.width))]
    plan += _encoder(t, "text.", cfg.depth) + _same("text.norm", f"{t}final_layer_norm")
    if family == "clip":
        return plan + _same("text_projection", "text_projection", ("weight",))
    return plan + _same("text_projection", f"{t}head")


def _plan(cfg: CLIPConfig | ViTConfig, family: str) -> list[_Pair]:
    """Every tensor of a vision-only model (a ViTConfig) or a whole CLIP / SigLIP model (a CLIPConfig)."""
    if isinstance(cfg, ViTConfig):
        return _vision(cfg, family, "", "")
    plan = _vision(cfg.vision, family, "vision_model.", "vision.") + _text(cfg.text, family)
    if family == "clip":
        plan += _same("visual_projection", "visual_projection", ("weight",))
    plan.append(_Pair(("logit_scale",), ("logit_scale",), () if family == "clip" else (1,)))  # () ours
    if family == "siglip":
        plan.append(_Pair(("logit_bias",), ("logit_bias",), (1,)))
    return plan


class _Source:
    """The HF state dict being consumed: `take` pops a tensor, remembering names that were not there."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        # position_ids are buffers that older transformers saved; they carry no weights
        self.state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        self.missing: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        return self.state.pop(key)


def _from_hf(src: _Source, plan: list[_Pair], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our state dict from the HF tensors; shapes are the target model's (a wrong size is left for load_into)."""
    out = {}
    for pair in plan:
        parts = [src.take(k) for k in pair.theirs]
        if any(t is None for t in parts):
            continue
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        want = [shapes[k] for k in pair.ours]
        sizes = [w[0] for w in want] if len(want) > 1 else None
        pieces = t.split(sizes) if sizes and t.ndim and sum(sizes) == t.shape[0] else [t]
        for k, piece, shape in zip(pair.ours, pieces, want):
            out[k] = piece.reshape(shape) if piece.numel() == shape.numel() else piece
    return out


def _to_hf(state: dict[str, torch.Tensor], plan: list[_Pair]) -> dict[str, torch.Tensor]:
    """HF's state dict from ours (each tensor its own contiguous copy: safetensors refuses shared storage)."""
    out = {}
    for pair in plan:
        t = state[pair.ours[0]] if len(pair.ours) == 1 else torch.cat([state[k] for k in pair.ours])
        pieces = t.chunk(len(pair.theirs)) if len(pair.theirs) > 1 else \
            [t if pair.hf_shape is None else t.reshape(pair.hf_shape)]
        for k, piece in zip(pair.theirs, pieces):
            out[k] = piece.detach().clone().contiguous()
    if unmapped := sorted(set(state) - {k for pair in plan for k in pair.ours}):
        raise RuntimeError(f"no Hugging Face name for {unmapped}")  # a gap in the plan, not bad input
    return out


def _check_consumed(src: _Source, arch: str) -> None:
    problems = []
    if src.missing:
        problems.append(f"missing keys: {', '.join(src.missing)}")
    if src.state:
        problems.append(f"unmapped keys: {', '.join(sorted(src.state))}")
    if problems:
        raise VitlabError(f"{arch} weights do not convert: {'; '.join(problems)}")


def convert_hf_clip(state: dict[str, torch.Tensor], config: dict, *, arch: str | None = None
                    ) -> CLIPModel | VisionTransformer:
    """A vitlab model from an HF CLIP/SigLIP state dict and config dict (fp32, eval mode).

    arch: the transformers class name; None: from config["architectures"] or config["model_type"].
    """
    arch = arch or (config.get("architectures") or [None])[0] or _MODEL_TYPES.get(config.get("model_type", ""))
    if arch not in _ARCHS:
        raise VitlabError(f"cannot convert {arch or config.get('model_type')!r}: supported are {sorted(_ARCHS)}")
    family, towers = _ARCHS[arch]
    src = _Source(state)
    if towers == "vision":
        if any(k.startswith("vision_model.") for k in src.state):  # hub files of transformers < 5
            src.state = {k.removeprefix("vision_model."): v for k, v in src.state.items()}
        cfg = vision_config_from_hf(config, family)
        model = VisionTransformer(cfg)
    else:
        cfg = clip_config_from_hf(config, family)
        model = create_clip(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = _from_hf(src, _plan(cfg, family), shapes)
    _check_consumed(src, arch)
    out = {k: v.float() for k, v in out.items()}
    load_into(model, out, source=f"converted {arch} weights")
    return model.eval()


def from_hf_clip(hf_model) -> CLIPModel | VisionTransformer:
    """vitlab model with the same outputs as a transformers CLIPModel / CLIPVisionModel / SiglipModel /
    SiglipVisionModel: image and text embeddings, logits, or the vision model's pooler_output."""
    return convert_hf_clip(hf_model.state_dict(), hf_model.config.to_dict(), arch=type(hf_model).__name__)


def load_hf_clip(directory: str | Path) -> CLIPModel | VisionTransformer:
    """Convert a hub directory (config.json + model.safetensors, or sharded safetensors with an index)."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_NAME)
    index = directory / "model.safetensors.index.json"
    if (directory / WEIGHTS_NAME).is_file():
        state = load_state_dict(directory / WEIGHTS_NAME)
    elif index.is_file():
        state = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            state.update(load_state_dict(directory / shard))
    else:
        raise VitlabError(f"{directory} has no {WEIGHTS_NAME} (only safetensors weights are read)")
    return convert_hf_clip(state, config)


# ---- vitlab -> HF --------------------------------------------------------------------------------------
_TO_HF_ACTIVATIONS = {ours: hf for hf, ours in reversed(_ACTIVATIONS.items())}  # the first HF name of each


def hf_clip_config(cfg: CLIPConfig) -> dict:
    """config.json of transformers' CLIPModel / SiglipModel for a vitlab CLIPConfig (not checked here)."""
    v, t = cfg.vision, cfg.text
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, num_channels=v.in_channels, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=_TO_HF_ACTIVATIONS[v.activation], layer_norm_eps=v.norm_eps)
    # CLIP pools at the first eos_token_id, or (legacy configs with eos id 2) at the largest id
    eos = 2 if t.pooling == "argmax" else t.eos_token_id
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=_TO_HF_ACTIVATIONS[t.activation], layer_norm_eps=t.norm_eps, eos_token_id=eos,
                bos_token_id=None, pad_token_id=None)  # the model never reads these; the tokenizer does
    if cfg.kind == "clip":
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
                "logit_scale_init_value": cfg.logit_scale_init,
                "text_config": {**text, "model_type": "clip_text_model", "projection_dim": cfg.embed_dim},
                "vision_config": {**vision, "model_type": "clip_vision_model", "projection_dim": cfg.embed_dim}}
    return {"architectures": ["SiglipModel"], "model_type": "siglip",
            "text_config": {**text, "model_type": "siglip_text_model", "projection_size": cfg.embed_dim},
            "vision_config": {**vision, "model_type": "siglip_vision_model", "vision_use_head": v.pooling == "map"}}


def to_hf_clip(model: CLIPModel) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json dict) of the transformers CLIPModel / SiglipModel with this model's outputs.

    CLIP's temperature is stored clamped at ln(100): vitlab clamps exp(logit_scale) at 100, transformers does
    not. Dropout rates (training only) are dropped. Anything transformers'
    towers cannot express (registers, LayerScale, another pooling, ...) raises a VitlabError naming it.
    """
    cfg = model.cfg
    hf_config = hf_clip_config(cfg)
    try:  # read the config back with the importer: what does not come back, transformers cannot express
        back = clip_config_from_hf(hf_config, cfg.kind)
    except VitlabError as e:
        raise VitlabError(f"transformers' {cfg.kind.upper()} cannot express this model: {e}") from None
    want = effective_fields(dataclasses.replace(cfg.vision, dropout=0.0, attn_dropout=0.0, head_dropout=0.0,
                                                drop_path=0.0))
    got = effective_fields(back.vision)
    lost = [f"vision tower: {describe_feature(k, v)}" for k, v in want.items() if got[k] != v]
    lost += [f"text tower: {f.name}={getattr(cfg.text, f.name)!r}" for f in dataclasses.fields(cfg.text)
             if getattr(back.text, f.name) != getattr(cfg.text, f.name)]
    if back.embed_dim != cfg.embed_dim:
        lost.append(f"embed_dim={cfg.embed_dim}")
    if lost:
        raise VitlabError(f"transformers' {cfg.kind.upper()} cannot express " + "; ".join(lost))
    state = dict(model.state_dict())
    if cfg.kind == "clip":
        state["logit_scale"] = state["logit_scale"].clamp(max=math.log(MAX_CLIP_SCALE))
    return _to_hf(state, _plan(cfg, cfg.kind)), hf_config
