"""timm `VisionTransformer` <-> vitlab; the entry points (`timm_kwargs`, `timm_class`, `to_timm`, `from_timm`,
`load_timm_checkpoint`) also take Swin models and configs, handled in `timm_swin.py`.

Our parameter names are timm's (`patch_embed.proj`, `blocks.i.attn.qkv`, `ls1.gamma`, `attn_pool.*`, ...),
so converting weights is a strict load with identity renaming; the work is mapping the *config*:
`timm_kwargs` writes timm constructor arguments for a ViTConfig, `timm_config` reads a ViTConfig
back off a live timm model (attributes and module shapes), and `timm_config_from_state_dict`
infers one from a bare checkpoint plus a vitlab variant string (for files with no model args).

Fixed sin-cos positions (`pos_embed="sincos2d"`) have no timm option: they are exported as a
learned patch-only table (`no_embed_class=True`) holding the sin-cos values. Outputs then match
timm at the configured size; at other sizes timm resamples the table bicubically while vitlab
recomputes sin-cos, so they differ slightly.

timm is imported inside the functions that need it: it is an optional dependency.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vitlab.convert.timm_swin import from_timm_swin, swin_timm_kwargs, to_timm_swin
from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig, parse_variant
from vitlab.model.swin import SwinConfig, SwinTransformer
from vitlab.model.vit import VisionTransformer
from vitlab.weights import describe_mismatch, load_into

_TO_TIMM_POOL = {"cls": "token", "gap": "avg", "map": "map"}
_FROM_TIMM_POOL = {v: k for k, v in _TO_TIMM_POOL.items()}


# ---- vitlab -> timm ----------------------------------------------------------------------------------
def timm_kwargs(cfg: ViTConfig | SwinConfig) -> dict:
    """Keyword arguments for `timm.models.vision_transformer.VisionTransformer(**kw)` matching `cfg`
    (for a SwinConfig: timm's `SwinTransformer`).

    `dynamic_img_size=True`, so the timm model takes other input sizes the way ours does.
    Raises VitlabError for what timm's class cannot express.
    """
    if isinstance(cfg, SwinConfig):
        return swin_timm_kwargs(cfg)
    problems = []
    if cfg.pre_logits_dim:
        problems.append(f"pre_logits_dim={cfg.pre_logits_dim} (timm's ViT has no pre-logits layer)")
    if cfg.use_patch_bias == cfg.pre_norm:
        problems.append(f"patch_bias={cfg.use_patch_bias} with pre_norm={cfg.pre_norm} "
                        "(timm ties the patch-embedding bias to `not pre_norm`)")
    if cfg.stem != "patchify":
        problems.append(f"stem={cfg.stem!r} (timm's ViT embeds patches with one strided conv)")
    if cfg.pooling not in _TO_TIMM_POOL:
        problems.append(f"pooling={cfg.pooling!r} (timm's ViT pools by {sorted(_TO_TIMM_POOL.values())})")
    if cfg.distill_token and (cfg.pooling != "cls" or cfg.reg_tokens or not cfg.pos_embed_prefix):
        problems.append("a distillation token with other than class-token pooling, registers or positions "
                        "outside the prefix (timm's VisionTransformerDistilled has none of these)")
    mlp_ratio = cfg.mlp_dim / cfg.width
    if int(cfg.width * mlp_ratio) != cfg.mlp_dim:  # timm sizes the MLP as int(dim * mlp_ratio)
        problems.append(f"mlp_dim={cfg.mlp_dim} (int(width * mlp_ratio) gives {int(cfg.width * mlp_ratio)})")
    if problems:
        raise VitlabError("timm's VisionTransformer cannot express this config: " + "; ".join(problems))
    sincos = cfg.pos_embed == "sincos2d"  # exported as a learned table over the patches only
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
        num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, reg_tokens=cfg.reg_tokens,
        no_embed_class=sincos or not cfg.pos_embed_prefix,
        pos_embed="none" if cfg.pos_embed == "none" else "learn",
        global_pool=_TO_TIMM_POOL[cfg.pooling], fc_norm=cfg.use_fc_norm, pre_norm=cfg.pre_norm,
        final_norm=cfg.final_norm, init_values=cfg.layerscale_init or None,
        act_layer=cfg.activation,  # our names are timm's get_act_layer names
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps),
        dynamic_img_size=True,
        drop_rate=cfg.head_dropout, pos_drop_rate=cfg.dropout, proj_drop_rate=cfg.dropout,
        attn_drop_rate=cfg.attn_dropout, drop_path_rate=cfg.drop_path,
    )


def timm_class(cfg: ViTConfig | SwinConfig) -> type:
    """timm's class for `cfg`: VisionTransformer, DeiT's VisionTransformerDistilled with a distillation token,
    or SwinTransformer."""
    if isinstance(cfg, SwinConfig):
        from timm.models.swin_transformer import SwinTransformer as TimmSwin

        return TimmSwin
    if cfg.distill_token:
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT


def to_timm(model: VisionTransformer | SwinTransformer) -> dict[str, torch.Tensor]:
    """A state dict that `timm_class(cfg)(**timm_kwargs(cfg))` loads with strict=True."""
    if isinstance(model, SwinTransformer):
        return to_timm_swin(model)
    timm_kwargs(model.cfg)  # raises if timm cannot hold this model
    state = dict(model.state_dict())
    if model.cfg.pos_embed == "sincos2d":  # a non-persistent buffer here, a learned table in timm
        state["pos_embed"] = model.pos_embed.detach().clone()
    return state


# ---- timm -> vitlab ----------------------------------------------------------------------------------
def from_timm_state_dict(state: dict[str, torch.Tensor], cfg: ViTConfig) -> VisionTransformer:
    """Our model with `cfg`, holding a timm VisionTransformer state dict (names are identical; strict)."""
    state = dict(state)
    model = VisionTransformer(cfg)
    if cfg.pos_embed == "sincos2d" and "pos_embed" in state:
        # An exported sin-cos table (see to_timm): accept it only if it is ours, since ours is fixed.
        theirs, ours = state.pop("pos_embed"), model.pos_embed
        if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), atol=1e-6):
            raise VitlabError("pos_embed in the timm weights is not the fixed sincos2d table of this config; "
                              "convert with pos_embed='learned' instead")
    return load_into(model, state, source="timm weights").eval()


def from_timm(timm_model: nn.Module) -> VisionTransformer | SwinTransformer:
    """A vitlab model with the same outputs as a timm `VisionTransformer` or `SwinTransformer` (config read off
    the model)."""
    if type(timm_model).__name__ == "SwinTransformer":
        return from_timm_swin(timm_model)
    return from_timm_state_dict(timm_model.state_dict(), timm_config(timm_model))


def _activation_name(act: nn.Module) -> str:
    from timm.layers import GELU, GELUTanh, QuickGELU

    from vitlab.model.vit import QuickGELU as OurQuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    known = ((GELU, "gelu"), (GELUTanh, "gelu_tanh"), (QuickGELU, "quick_gelu"), (OurQuickGELU, "quick_gelu"))
    for cls, name in known:
        if type(act) is cls:
            return name
    raise VitlabError(f"activation {type(act).__name__}: vitlab has gelu, gelu_tanh and quick_gelu only")


def timm_config(m: nn.Module) -> ViTConfig:
    """Read the ViTConfig of a timm `VisionTransformer` from its attributes and module shapes.

    Anything outside plain ViT (qk-norm, SwiGLU, RMSNorm, gated attention, other poolings, ...)
    raises VitlabError naming it. Dropout rates are read too, though they only matter in training.
    """
    from timm.layers import Attention, AttentionPoolLatent, LayerScale, Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if type(m) not in (TimmViT, VisionTransformerDistilled):
        raise VitlabError("from_timm reads timm VisionTransformer (and distilled DeiT) models; "
                          f"got {type(m).__name__}")
    distilled = type(m) is VisionTransformerDistilled
    problems: list[str] = []
    pe = m.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or pe.dynamic_img_pad:
        problems.append("patch embedding other than a plain conv (norm or dynamic padding)")
    img, patch = tuple(pe.img_size), tuple(pe.patch_size)
    if img[0] != img[1] or patch[0] != patch[1]:
        problems.append(f"non-square img_size {img} / patch_size {patch}")
    blk0 = m.blocks[0]
    for i, b in enumerate(m.blocks):
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            problems.append(f"blocks.{i} is not a plain timm Block(Attention, Mlp)")
            continue
        extras = [n for n, mod in (("attn.q_norm", b.attn.q_norm), ("attn.k_norm", b.attn.k_norm),
                                   ("attn.norm", b.attn.norm), ("mlp.norm", b.mlp.norm))
                  if not isinstance(mod, nn.Identity)]
        if getattr(b.attn, "gate", None) is not None:
            extras.append("attn.gate")
        if extras:
            problems.append(f"blocks.{i} has {', '.join(extras)}")
        if type(b.ls1) is not type(blk0.ls1) or not isinstance(b.ls1, LayerScale | nn.Identity):
            problems.append(f"blocks.{i} LayerScale differs from blocks.0")
    norms = [(n, mod) for n, mod in m.named_modules() if "norm" in n.rsplit(".", 1)[-1]
             and not isinstance(mod, nn.Identity)]
    eps = {mod.eps for _, mod in norms if isinstance(mod, nn.LayerNorm)}
    odd = [n for n, mod in norms if not isinstance(mod, nn.LayerNorm) or not mod.elementwise_affine]
    if odd:
        problems.append(f"norm layers other than affine LayerNorm: {odd}")
    if len(eps) > 1:
        problems.append(f"LayerNorm eps differs between layers: {sorted(eps)}")
    if m.global_pool not in _FROM_TIMM_POOL:
        problems.append(f"global_pool={m.global_pool!r} (vitlab pools by 'token', 'avg' or 'map')")
    if m.pool_include_prefix:
        problems.append("pool_include_prefix=True")
    ap = m.attn_pool
    if ap is not None and (
            type(ap) is not AttentionPoolLatent or ap.latent_len != 1 or ap.pos_embed is not None
            or not isinstance(ap.q, nn.Linear) or not isinstance(ap.q_norm, nn.Identity)
            or ap.pool != "token" or ap.mlp is None or ap.num_heads != blk0.attn.num_heads
            or ap.mlp.fc1.out_features != blk0.mlp.fc1.out_features
            or _activation_name(ap.mlp.act) != _activation_name(blk0.mlp.act)):
        problems.append("attn_pool is not a one-latent MAP head with the blocks' heads, MLP and activation")
    if problems:
        raise VitlabError("timm model has parts vitlab's ViT does not: " + "; ".join(problems))

    D = m.embed_dim
    n_pre = m.num_prefix_tokens
    num_patches = pe.grid_size[0] * pe.grid_size[1]
    if m.pos_embed is not None:
        want = num_patches + (0 if m.no_embed_class else n_pre)
        if m.pos_embed.shape[1] != want:
            raise VitlabError(f"timm pos_embed has {m.pos_embed.shape[1]} positions, expected {want}")
    layerscale = None
    if isinstance(blk0.ls1, LayerScale):
        g = blk0.ls1.gamma.detach()
        # The init value only matters for re-initialisation; a constant gamma is a fresh init, keep it.
        layerscale = float(f"{float(g[0]):.7g}") if bool((g == g[0]).all()) and float(g[0]) != 0.0 else 1e-5
    final_norm = not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity))
    pooling = _FROM_TIMM_POOL[m.global_pool]
    pre_norm = not isinstance(m.norm_pre, nn.Identity)
    fc_norm = not isinstance(m.fc_norm, nn.Identity) if final_norm else None
    patch_bias = pe.proj.bias is not None
    last_dp = m.blocks[-1].drop_path1
    return ViTConfig(
        image_size=img[0], patch_size=patch[0], in_channels=pe.proj.in_channels, num_classes=m.num_classes,
        width=D, depth=len(m.blocks), heads=blk0.attn.num_heads, mlp_dim=blk0.mlp.fc1.out_features,
        qkv_bias=blk0.attn.qkv.bias is not None,
        pos_embed="learned" if m.pos_embed is not None else "none",
        pos_embed_prefix=not m.no_embed_class or n_pre == 0, class_token=m.cls_token is not None,
        reg_tokens=m.num_reg_tokens, distill_token=distilled,
        pooling=pooling,
        dropout=blk0.attn.proj_drop.p, attn_dropout=blk0.attn.attn_drop.p, head_dropout=m.head_drop.p,
        drop_path=getattr(last_dp, "drop_prob", 0.0),
        layerscale_init=layerscale, norm_eps=eps.pop() if eps else 1e-6,
        activation=_activation_name(blk0.mlp.act), pre_norm=pre_norm, final_norm=final_norm,
        **_auto_flags(pooling=pooling, pre_norm=pre_norm, fc_norm=fc_norm, patch_bias=patch_bias),
        name=str(getattr(m, "pretrained_cfg", {}).get("architecture", "") or ""),
    )


def _auto_flags(*, pooling: str, pre_norm: bool, fc_norm: bool | None, patch_bias: bool) -> dict:
    """fc_norm / patch_bias as ViTConfig fields: None where the value is what vitlab picks by itself
    (fc_norm for gap, bias unless pre_norm), so converted configs compare equal to the originals."""
    return dict(fc_norm=None if fc_norm is None or fc_norm == (pooling == "gap") else fc_norm,
                patch_bias=None if patch_bias != pre_norm else patch_bias)


def timm_config_from_state_dict(state: dict[str, torch.Tensor], *, variant: str,
                                image_size: int | None = None, num_classes: int | None = None,
                                global_pool: str | None = None, **overrides) -> ViTConfig:
    """Infer a ViTConfig for a bare timm checkpoint: sizes from the vitlab `variant` ("Ti/16"),
    structure (tokens, pooling, norms, biases, LayerScale, head) from which keys are present.

    `global_pool` is timm's name ('token', 'avg', 'map'; timm's hub config.json records it): keys
    cannot tell class-token pooling from averaging without fc_norm, so without it the guess is
    'avg' when there is an fc_norm or no class token, else 'token'. What keys cannot tell
    (activation, LayerNorm eps) keeps the variant's defaults (gelu, 1e-6) unless given in
    `overrides`; wrong sizes surface as a strict-load error.
    """
    P = overrides.get("patch_size", parse_variant(variant).patch_size)
    reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    cls_tok, dist_tok = "cls_token" in state, "dist_token" in state
    n_pre = int(cls_tok) + int(dist_tok) + reg
    inferred: dict = dict(class_token=cls_tok, reg_tokens=reg, distill_token=dist_tok,
                          qkv_bias="blocks.0.attn.qkv.bias" in state,
                          pre_norm="norm_pre.weight" in state,
                          final_norm="fc_norm.weight" in state or "norm.weight" in state)
    if global_pool is not None:
        if global_pool not in _FROM_TIMM_POOL:
            raise VitlabError(f"global_pool {global_pool!r}: vitlab pools by {sorted(_FROM_TIMM_POOL)}")
        inferred["pooling"] = _FROM_TIMM_POOL[global_pool]
    elif any(k.startswith("attn_pool.") for k in state):
        inferred["pooling"] = "map"
    else:
        inferred["pooling"] = "gap" if "fc_norm.weight" in state or not cls_tok else "cls"
    fc_norm = "fc_norm.weight" in state if inferred["final_norm"] else None
    inferred.update(_auto_flags(pooling=inferred["pooling"], pre_norm=inferred["pre_norm"], fc_norm=fc_norm,
                                patch_bias="patch_embed.proj.bias" in state))
    if "blocks.0.ls1.gamma" in state:
        inferred["layerscale_init"] = 1e-5  # only the init value; the trained gammas are loaded
    if num_classes is None:
        num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    inferred["num_classes"] = num_classes
    if "pos_embed" not in state:
        inferred["pos_embed"] = "none"
    else:
        n = int(state["pos_embed"].shape[1])
        if image_size is None:  # the table's length gives the grid, with or without the prefix tokens
            fits = [(math.isqrt(m) * P, with_prefix) for m, with_prefix in ((n - n_pre, True), (n, False))
                    if m > 0 and math.isqrt(m) ** 2 == m]
            if n_pre == 0:
                fits = fits[:1]
            if len(fits) != 1:
                raise VitlabError(f"cannot tell the image size from pos_embed with {n} positions and {n_pre} "
                                  f"prefix tokens ({'ambiguous' if fits else 'not a square grid'}); "
                                  "pass image_size (--image-size)")
            image_size, inferred["pos_embed_prefix"] = fits[0]
        else:
            inferred["pos_embed_prefix"] = n != (image_size // P) ** 2 or n_pre == 0
    if image_size is not None:
        inferred["image_size"] = image_size
    inferred.update(overrides)
    return parse_variant(variant, **inferred)


def load_timm_checkpoint(state: dict[str, torch.Tensor], timm_config_json: dict, *,
                         image_size: int | None = None,
                         num_classes: int | None = None) -> VisionTransformer | SwinTransformer:
    """Convert weights saved with a timm hub `config.json` (`architecture`, `num_classes`, `model_args`).

    Builds the named timm architecture (no download), loads the weights strictly, then `from_timm`.
    """
    arch = timm_config_json.get("architecture")
    if not arch:
        raise VitlabError("config.json names no timm 'architecture'; describe the model with --variant")
    try:
        import timm
    except ImportError:
        raise VitlabError(f"config.json names timm architecture {arch!r}: building it needs timm "
                          "(pip install timm), or describe the model with a variant (--variant)") from None
    kwargs = dict(timm_config_json.get("model_args") or {})
    if num_classes is not None or "num_classes" in timm_config_json:
        kwargs["num_classes"] = num_classes if num_classes is not None else timm_config_json["num_classes"]
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        tm = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, AssertionError, ValueError) as e:
        raise VitlabError(f"timm cannot build {arch!r} with {kwargs}: {e}") from None
    problem = describe_mismatch(tm.state_dict(), state)
    if problem:
        raise VitlabError(f"weights do not match timm {arch!r}: {problem}")
    tm.load_state_dict(state, strict=True)
    return from_timm(tm.eval())
