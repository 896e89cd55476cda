"""Hugging Face CLIP / SigLIP -> vitlab, on state dicts and config dicts (so a hub directory converts too).

Supported: `CLIPModel`, `CLIPVisionModel`, `SiglipModel`, `SiglipVisionModel` (hub files and transformers-5
in-memory names; vision-only checkpoints with or without the `vision_model.` prefix). Whole models become a
`CLIPModel`/`SigLIPModel`, vision-only ones a `VisionTransformer` (num_classes=0) whose output is HF's
`pooler_output`. Every HF tensor must be used and every vitlab tensor filled, or a VitlabError lists them.

Per encoder layer: layer_norm1/2 -> norm1/2, self_attn.{q,k,v}_proj -> attn.qkv (concatenated in that
order), self_attn.out_proj -> attn.proj, mlp.fc1/fc2 -> mlp.fc1/fc2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.model import CLIPModel, create_clip
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


# ---- state dicts ----------------------------------------------------------------------------------------
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

    def move(self, out: dict, ours: str, theirs: str, *, params: tuple[str, ...] = ("weight", "bias")) -> None:
        for p in params:
            t = self.take(f"{theirs}.{p}")
            if t is not None:
                out[f"{ours}.{p}"] = t


def _put(out: dict, key: str, t: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> None:
    if t is not None:
        out[key] = t.reshape(shape) if shape is not None else t


def _encoder(src: _Source, out: dict, theirs: str, ours: str, depth: int) -> None:
    for i in range(depth):
        h, o = f"{theirs}encoder.layers.{i}.", f"{ours}blocks.{i}."
        for hn, on in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            src.move(out, o + on, h + hn)
        for p in ("weight", "bias"):
            qkv = [src.take(f"{h}self_attn.{n}_proj.{p}") for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"{o}attn.qkv.{p}"] = torch.cat(qkv)  # (3D, D) / (3D,), q then k then v


def _vision(src: _Source, out: dict, cfg: ViTConfig, family: str, theirs: str, ours: str) -> None:
    D = cfg.width
    e = f"{theirs}embeddings."
    src.move(out, f"{ours}patch_embed.proj", f"{e}patch_embedding",
             params=("weight", "bias") if cfg.use_patch_bias else ("weight",))
    _put(out, f"{ours}pos_embed", src.take(f"{e}position_embedding.weight"), (1, -1, D))
    _encoder(src, out, theirs, ours, cfg.depth)
    if family == "clip":
        _put(out, f"{ours}cls_token", src.take(f"{e}class_embedding"), (1, 1, D))
        src.move(out, f"{ours}norm_pre", f"{theirs}pre_layrnorm")
        src.move(out, f"{ours}fc_norm", f"{theirs}post_layernorm")
        return
    src.move(out, f"{ours}norm", f"{theirs}post_layernorm")
    if cfg.pooling != "map":
        return
    h, o = f"{theirs}head.", f"{ours}attn_pool."
    _put(out, f"{o}latent", src.take(f"{h}probe"), (1, 1, D))
    for p in ("weight", "bias"):  # nn.MultiheadAttention packs q, k, v: q -> our q, (k, v) -> our kv
        t = src.take(f"{h}attention.in_proj_{p}")
        if t is not None:
            out[f"{o}q.{p}"], out[f"{o}kv.{p}"] = t[:D], t[D:]
    src.move(out, f"{o}proj", f"{h}attention.out_proj")
    src.move(out, f"{o}norm", f"{h}layernorm")
    src.move(out, f"{o}mlp.fc1", f"{h}mlp.fc1")
    src.move(out, f"{o}mlp.fc2", f"{h}mlp.fc2")


def _text(src: _Source, out: dict, cfg: TextConfig, family: str) -> None:
    t = "text_model."
    _put(out, "text.token_embedding.weight", src.take(f"{t}embeddings.token_embedding.weight"))
    _put(out, "text.pos_embed", src.take(f"{t}embeddings.position_embedding.weight"), (1, -1, cfg.width))
    _encoder(src, out, t, "text.", cfg.depth)
    src.move(out, "text.norm", f"{t}final_layer_norm")
    if family == "clip":
        src.move(out, "text_projection", "text_projection", params=("weight",))
    else:
        src.move(out, "text_projection", f"{t}head")


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
    out: dict[str, torch.Tensor] = {}
    if towers == "vision":
        if any(k.startswith("vision_model.") for k in src.state):  # hub files of transformers < 5
            src.state = {k.removeprefix("vision_model."): v for k, v in src.state.items()}
        cfg = vision_config_from_hf(config, family)
        _vision(src, out, cfg, family, "", "")
        _check_consumed(src, arch)
        model = VisionTransformer(cfg)
    else:
        cfg = clip_config_from_hf(config, family)
        _vision(src, out, cfg.vision, family, "vision_model.", "vision.")
        _text(src, out, cfg.text, family)
        if family == "clip":
            src.move(out, "visual_projection", "visual_projection", params=("weight",))
        _put(out, "logit_scale", src.take("logit_scale"), ())
        if family == "siglip":
            _put(out, "logit_bias", src.take("logit_bias"), ())
        _check_consumed(src, arch)
        model = create_clip(cfg)
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
