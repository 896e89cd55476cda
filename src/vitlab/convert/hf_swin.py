"""Hugging Face transformers Swin (`SwinModel`, `SwinForImageClassification`) <-> vitlab's `SwinTransformer`.

Like `hf_vit.py` it works on state dicts and config dicts, so a live model and a hub directory convert alike.
One plan of names (`_plan`, pairs built from the config) serves both directions; hub files spell them

    hub files (what save_pretrained writes)                 vitlab (= timm 1.0)
    embeddings.patch_embeddings.projection / .norm         patch_embed.proj / .norm
    encoder.layers.i.blocks.j.layernorm_before / _after     layers.i.blocks.j.norm1 / norm2
    ...attention.self.query / key / value                   ...attn.qkv (stacked q, k, v)
    ...attention.self.relative_position_bias_table          ...attn.relative_position_bias_table
    ...attention.output.dense                               ...attn.proj
    ...intermediate.dense / output.dense                    ...mlp.fc1 / mlp.fc2
    encoder.layers.i.downsample.norm / .reduction           layers.(i+1).downsample.norm / .reduction
    layernorm / classifier                                  norm / head.fc

with the encoder under `swin.` in SwinForImageClassification. transformers 5 renames the block's tensors in
memory (attention.q_proj / k_proj / v_proj / o_proj, attention.relative_position_bias.relative_position_bias_table,
mlp.fc1 / fc2); both spellings are read. HF's patch merging ENDS stage i, timm's and ours STARTS stage i+1, hence
the shifted index. `relative_position_index` is a buffer here and in HF (older hub files hold it: it is skipped);
the shifted-window masks are buffers (ours) or built on the fly (HF). SwinModel's pooler has no weights: it is
the average over the final grid, our `forward` without a classifier (num_classes 0).

Where the two libraries compute different functions, both directions refuse the config with a one-line error
(measured against transformers 5.24 in tests/convert/test_hf_swin.py):
- a stage grid the window does not divide, in a stage with a shifted block: HF pads the grid up to a multiple of
  the window BEFORE the cyclic shift, timm and vitlab shift first and pad after, so the shifted windows hold
  other tokens (final features differ by ~0.4 on random weights). Unshifted blocks pad the same way in both, so a
  one-block stage on such a grid converts, and so do grids the window divides.
- a stage grid SMALLER than the window: timm and vitlab shrink the window to the grid (with a bias table of the
  small window); HF shrinks the window but keeps the full window's bias table and index, and its forward fails.
  A grid EQUAL to the window is one unshifted window in all three and converts.
Also refused: absolute position embeddings, an activation other than exact GELU, layer_norm_eps other than 1e-5
(HF's patch-embedding and merging norms always use 1e-5, ours one norm_eps), non-square sizes, and (to HF) a
pooling other than the average. Dropout and stochastic depth (training only) carry over as attn_drop_rate and
drop_path; HF's hidden dropout and vitlab's head dropout have no counterpart and are dropped.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from vitlab.convert.files import locate, read_weights
from vitlab.convert.hf_clip import _check_consumed, _from_hf, _Pair, _same, _Source, _square, _to_hf
from vitlab.errors import VitlabError
from vitlab.model.swin import SwinConfig, SwinTransformer
from vitlab.weights import load_into

ARCHS = ("SwinModel", "SwinForImageClassification")
# transformers' SwinConfig defaults, for hub configs that leave fields out
_HF_DEFAULTS = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
                    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, drop_path_rate=0.1, hidden_act="gelu",
                    use_absolute_embeddings=False, layer_norm_eps=1e-5)
HF_NORM_EPS = 1e-5  # nn.LayerNorm's default: HF's patch-embedding and patch-merging norms ignore layer_norm_eps
_PREFIX = "swin."  # SwinForImageClassification holds the encoder under swin.; the classifier stays at the top
# transformers 5 in-memory names -> hub names (inside a block)
_MEM_TO_HUB = [(re.compile(r"\.attention\.q_proj\."), ".attention.self.query."),
               (re.compile(r"\.attention\.k_proj\."), ".attention.self.key."),
               (re.compile(r"\.attention\.v_proj\."), ".attention.self.value."),
               (re.compile(r"\.attention\.relative_position_bias\.relative_position_bias_table$"),
                ".attention.self.relative_position_bias_table"),
               (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
               (re.compile(r"(\.blocks\.\d+)\.mlp\.fc1\."), r"\1.intermediate.dense."),
               (re.compile(r"(\.blocks\.\d+)\.mlp\.fc2\."), r"\1.output.dense.")]


# ---- configs --------------------------------------------------------------------------------------------
def hf_layout_problem(cfg: SwinConfig) -> str | None:
    """Why transformers' Swin would compute something else than ours for this config, or None (see the docstring)."""
    ws = cfg.window_size
    for i, (grid, depth) in enumerate(zip(cfg.stage_grids, cfg.depths)):
        if grid < ws:
            return (f"stage {i}'s {grid}x{grid} grid is smaller than the {ws}x{ws} window: transformers' Swin keeps "
                    f"the full window's bias table there and cannot run it (vitlab and timm shrink the window)")
        if grid > ws and grid % ws and depth > 1:
            return (f"stage {i}'s {grid}x{grid} grid is not a multiple of the {ws}x{ws} window: transformers pads "
                    "it before the cyclic shift, vitlab (as timm) after, so their shifted windows differ")
    return None


def swin_config_from_hf(hf_config: dict, num_classes: int) -> SwinConfig:
    """Our SwinConfig for an HF Swin config dict (config.json); `num_classes` comes from the weights."""
    model_type = hf_config.get("model_type", "swin")
    if model_type != "swin":
        raise VitlabError(f"config model_type {model_type!r} is not a Swin Transformer (expected 'swin')")
    c = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    if c["use_absolute_embeddings"]:
        raise VitlabError("use_absolute_embeddings=True: vitlab's Swin has no absolute position embeddings "
                          "(only the relative position bias)")
    if c["hidden_act"] != "gelu":
        raise VitlabError(f"hidden_act {c['hidden_act']!r}: vitlab's Swin uses exact GELU ('gelu')")
    if float(c["layer_norm_eps"]) != HF_NORM_EPS:
        raise VitlabError(f"layer_norm_eps={c['layer_norm_eps']}: transformers' Swin uses it in its blocks but "
                          f"{HF_NORM_EPS} in the patch-embedding and merging norms; vitlab's Swin has one norm_eps")
    cfg = SwinConfig(
        image_size=_square(c["image_size"], "image_size"), patch_size=_square(c["patch_size"], "patch_size"),
        in_channels=int(c["num_channels"]), num_classes=num_classes, embed_dim=int(c["embed_dim"]),
        depths=tuple(int(d) for d in c["depths"]), num_heads=tuple(int(h) for h in c["num_heads"]),
        window_size=int(c["window_size"]), mlp_ratio=float(c["mlp_ratio"]), qkv_bias=bool(c["qkv_bias"]),
        attn_drop_rate=float(c["attention_probs_dropout_prob"]), drop_path=float(c["drop_path_rate"]),
        norm_eps=HF_NORM_EPS, global_pool="avg", name=str(hf_config.get("_name_or_path") or ""))
    if problem := hf_layout_problem(cfg):
        raise VitlabError(problem)
    return cfg


def hf_swin_config(cfg: SwinConfig, class_names: list[str] | None = None) -> dict:
    """config.json of the transformers Swin for a vitlab SwinConfig (not checked here: see `to_hf_swin`)."""
    d = {"architectures": ["SwinForImageClassification" if cfg.num_classes else "SwinModel"], "model_type": "swin",
         "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_channels,
         "embed_dim": cfg.embed_dim, "depths": list(cfg.depths), "num_heads": list(cfg.num_heads),
         "window_size": cfg.window_size, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": cfg.attn_drop_rate,
         "drop_path_rate": cfg.drop_path, "hidden_act": "gelu", "use_absolute_embeddings": False,
         "layer_norm_eps": cfg.norm_eps, "encoder_stride": cfg.patch_size * 2 ** (cfg.num_stages - 1)}
    if cfg.num_classes:
        names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]  # transformers' placeholders
        if len(names) != cfg.num_classes:
            raise VitlabError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
        d.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    return d


# ---- names ----------------------------------------------------------------------------------------------
def _plan(cfg: SwinConfig) -> list[_Pair]:
    """Every tensor of the model: (ours, HF's in hub spelling without the `swin.` prefix)."""
    plan = _same("patch_embed.proj", "embeddings.patch_embeddings.projection") + \
        _same("patch_embed.norm", "embeddings.norm")
    for i, depth in enumerate(cfg.depths):
        if i:  # our stage i starts with the merge that ends HF's stage i-1
            h = f"encoder.layers.{i - 1}.downsample."
            plan += _same(f"layers.{i}.downsample.norm", h + "norm") + \
                _same(f"layers.{i}.downsample.reduction", h + "reduction", ("weight",))
        for j in range(depth):
            h, o = f"encoder.layers.{i}.blocks.{j}.", f"layers.{i}.blocks.{j}."
            for hn, on in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                           ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                           ("output.dense", "mlp.fc2")):
                plan += _same(o + on, h + hn)
            plan.append(_Pair((f"{o}attn.relative_position_bias_table",),
                              (f"{h}attention.self.relative_position_bias_table",)))
            for p in ("weight", "bias") if cfg.qkv_bias else ("weight",):  # (3C, C) / (3C,): q, k, v
                plan.append(_Pair((f"{o}attn.qkv.{p}",),
                                  tuple(f"{h}attention.self.{n}.{p}" for n in ("query", "key", "value"))))
    plan += _same("norm", "layernorm")
    return plan + (_same("head.fc", "classifier") if cfg.num_classes else [])


def hub_spelling(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF Swin state dict (either spelling, with or without `swin.`) in hub spelling without the prefix.

    Buffers older hub files hold (relative_position_index) are dropped: they carry no weights.
    """
    out: dict[str, torch.Tensor] = {}
    twice = []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        k = key.removeprefix(_PREFIX)
        for pattern, repl in _MEM_TO_HUB:
            k = pattern.sub(repl, k)
        if k in out:
            twice.append(key)
        out[k] = value
    if twice:
        raise VitlabError(f"two keys for one tensor (both key spellings present?): {', '.join(sorted(twice)[:6])}")
    return out


# ---- HF -> vitlab ---------------------------------------------------------------------------------------
def hf_swin_state_to_vitlab(state: dict[str, torch.Tensor], cfg: SwinConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `cfg` from an HF Swin state dict; every HF tensor must be used, every one of ours found.

    No layout check: `from_hf_swin_state_dict` refuses the configs where the two models compute different things.
    """
    src = _Source(hub_spelling(state))
    with torch.device("meta"):  # only the shapes are needed
        shapes = {k: v.shape for k, v in SwinTransformer(cfg).state_dict().items()}
    out = _from_hf(src, _plan(cfg), shapes)
    _check_consumed(src, "Hugging Face Swin")
    return {k: v.float() for k, v in out.items()}


def from_hf_swin_state_dict(state: dict[str, torch.Tensor], hf_config: dict) -> SwinTransformer:
    """Our model (eval mode) from an HF Swin state dict (either key spelling) and its config dict."""
    arch = (hf_config.get("architectures") or [None])[0]
    if arch is not None and arch not in ARCHS:
        raise VitlabError(f"cannot convert {arch}: supported are {', '.join(ARCHS)}")
    hub = hub_spelling(state)
    num_classes = int(hub["classifier.weight"].shape[0]) if "classifier.weight" in hub else 0
    cfg = swin_config_from_hf(hf_config, num_classes)
    ours = hf_swin_state_to_vitlab(hub, cfg)
    return load_into(SwinTransformer(cfg), ours, source="Hugging Face Swin weights").eval()


def from_hf_swin(hf_model: torch.nn.Module) -> SwinTransformer:
    """A vitlab Swin with the outputs of a transformers `SwinModel` or `SwinForImageClassification`.

    SwinModel: our `forward_features` = `last_hidden_state` (as a grid), `forward` = `pooler_output`
    (num_classes 0). SwinForImageClassification: our logits = its logits.
    """
    name = type(hf_model).__name__
    if name not in ARCHS:
        raise VitlabError(f"from_hf converts SwinModel and SwinForImageClassification; got {name}")
    return from_hf_swin_state_dict(hf_model.state_dict(), {**hf_model.config.to_dict(), "architectures": [name]})


def load_hf_swin(src: str | Path) -> SwinTransformer:
    """Convert a hub directory (config.json + model.safetensors, or shards with an index), or its .safetensors file."""
    files, config = locate(Path(src))
    if config is None:
        raise VitlabError(f"no config.json next to {src}; Hugging Face conversion needs it")
    return from_hf_swin_state_dict(read_weights(files), config)


# ---- vitlab -> HF ---------------------------------------------------------------------------------------
def to_hf_swin(model: SwinTransformer, *, class_names: list[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in hub spelling, config.json dict) of the transformers Swin with this model's outputs.

    SwinForImageClassification for a classifier, SwinModel (whose pooler_output is our forward) without one.
    What transformers' Swin cannot express or computes differently raises a VitlabError naming it.
    """
    cfg = model.cfg
    hf_config = hf_swin_config(cfg, class_names)
    try:  # read the config back with the importer: what does not come back, transformers cannot express
        back = swin_config_from_hf(hf_config, cfg.num_classes)
    except VitlabError as e:
        raise VitlabError(f"transformers' Swin cannot express this model: {e}") from None
    want = dataclasses.replace(cfg, drop_rate=0.0)  # head dropout: training only, HF's Swin has none
    lost = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.compare and getattr(back, f.name) != getattr(want, f.name)]
    if lost:
        raise VitlabError("transformers' Swin cannot express " + ", ".join(lost) +
                          (" (it pools by averaging)" if cfg.global_pool != "avg" else ""))
    state = _to_hf(dict(model.state_dict()), _plan(cfg))
    if cfg.num_classes:
        state = {k if k.startswith("classifier.") else _PREFIX + k: v for k, v in state.items()}
    return state, hf_config
