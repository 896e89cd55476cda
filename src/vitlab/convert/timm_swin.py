"""timm `SwinTransformer` <-> vitlab `SwinTransformer`.

Our parameter names, shapes and buffer persistence are timm 1.0's (`layers.i.downsample` starts stage i > 0,
`relative_position_index` and `attn_mask` are non-persistent), so weights convert by a strict load with
identity renaming; the work is the config: `swin_timm_kwargs` writes timm constructor arguments for a
SwinConfig, `swin_timm_config` reads one back off a live timm model and refuses what ours cannot hold
(per-stage windows, `always_partition`, head_dim overrides, another activation, ...), and
`swin_config_from_state_dict` fits a bare checkpoint to a "swin-*" variant. timm's `proj_drop_rate`
(dropout after attention and MLP, training only) has no SwinConfig field and is not carried over.

timm is imported inside the functions that need it: it is an optional dependency.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.model.swin import POOLS, SwinConfig, SwinTransformer, parse_swin_variant
from vitlab.weights import load_into

TIMM_LAYERNORM_EPS = 1e-5  # what timm's Swin builds when its arguments name no norm_layer


def swin_timm_kwargs(cfg: SwinConfig) -> dict:
    """Keyword arguments for `timm.models.swin_transformer.SwinTransformer(**kw)` matching `cfg`.

    `dynamic_img_size=True`, so the timm model takes other input sizes the way ours does (same windows,
    masks built per call); at `image_size` it computes what the default (strict) model does.
    """
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels, num_classes=cfg.num_classes,
        global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads), window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path,
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps), dynamic_img_size=True,
    )


def to_timm_swin(model: SwinTransformer) -> dict[str, torch.Tensor]:
    """A state dict that `timm SwinTransformer(**swin_timm_kwargs(cfg))` loads with strict=True."""
    return dict(model.state_dict())


def from_timm_swin(timm_model: nn.Module) -> SwinTransformer:
    """A vitlab Swin with the same outputs as a timm `SwinTransformer` (config read off the model)."""
    model = SwinTransformer(swin_timm_config(timm_model))
    return load_into(model, timm_model.state_dict(), source="timm weights").eval()


def swin_timm_config(m: nn.Module) -> SwinConfig:
    """Read the SwinConfig of a timm `SwinTransformer` from its attributes and module shapes."""
    from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    if type(m) is not TimmSwin:
        raise VitlabError(f"from_timm reads timm SwinTransformer models here; got {type(m).__name__}")
    problems: list[str] = []
    pe = m.patch_embed
    img, patch = tuple(pe.img_size), tuple(pe.patch_size)
    if type(pe) is not PatchEmbed or type(pe.norm) is not nn.LayerNorm or pe.proj.bias is None \
            or getattr(pe, "dynamic_img_pad", False):
        problems.append("a patch embedding other than conv (with bias) + LayerNorm")
    if img[0] != img[1] or patch[0] != patch[1]:
        problems.append(f"non-square img_size {img} / patch_size {patch}")
    E = pe.proj.out_channels
    depths, heads, hidden = [], [], []
    for i, stage in enumerate(m.layers):
        dim = E * 2**i
        down = stage.downsample
        if (i == 0) != isinstance(down, nn.Identity) or (
                i and (type(down) is not PatchMerging or down.reduction.out_features != dim)):
            problems.append(f"layers.{i}.downsample is not a patch merging to {dim} channels (or stage 0 has one)")
        blocks = list(stage.blocks)
        if not blocks:
            problems.append(f"layers.{i} has no blocks")
            continue
        depths.append(len(blocks))
        heads.append(blocks[0].attn.num_heads)
        hidden.append(blocks[0].mlp.fc1.out_features)
        for j, b in enumerate(blocks):
            where = f"layers.{i}.blocks.{j}"
            if type(b) is not SwinTransformerBlock or type(b.attn) is not WindowAttention or type(b.mlp) is not Mlp:
                problems.append(f"{where} is not a plain SwinTransformerBlock(WindowAttention, Mlp)")
                continue
            if b.attn.qkv.in_features != dim or b.attn.qkv.out_features != 3 * dim:
                problems.append(f"{where} has head_dim * heads != its {dim} channels")
            if b.attn.num_heads != heads[-1] or b.mlp.fc1.out_features != hidden[-1]:
                problems.append(f"{where} differs from the stage's first block in heads or MLP size")
            if type(b.mlp.act) is not nn.GELU or b.mlp.act.approximate != "none" \
                    or not isinstance(b.mlp.norm, nn.Identity):
                problems.append(f"{where} MLP is not fc1 -> exact GELU -> fc2")
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    eps = {mod.eps for mod in norms}
    if len(eps) > 1:
        problems.append(f"LayerNorm eps differs between layers: {sorted(eps)}")
    if type(m.norm) is not nn.LayerNorm or any(not mod.elementwise_affine for mod in norms):
        problems.append("norm layers other than affine LayerNorm")
    head = m.head
    pool = getattr(getattr(head, "global_pool", None), "pool_type", None)
    if type(head) is not ClassifierHead or head.use_conv or pool not in POOLS:
        problems.append(f"a head other than a {'/'.join(POOLS)} pool + Linear (global_pool={pool!r})")
    # the windows asked for (before a small stage clamps them), one per stage
    refs = [tuple(w) for w in getattr(m, "_ref_window_sizes", None) or [m.layers[0].blocks[0].window_size]]
    if len(set(refs)) != 1 or refs[0][0] != refs[0][1]:
        problems.append(f"windows {refs} differ between stages or are not square")
    if problems:
        raise VitlabError("timm Swin has parts vitlab's Swin does not: " + "; ".join(problems))

    ratio = hidden[0] / E
    if any(int(d * ratio) != h for d, h in zip((E * 2**i for i in range(len(hidden))), hidden)):
        raise VitlabError(f"timm Swin MLP sizes {hidden} are not one mlp_ratio of the stage widths")
    last = m.layers[-1].blocks[-1].drop_path1
    cfg = SwinConfig(
        image_size=img[0], patch_size=patch[0], in_channels=pe.proj.in_channels, num_classes=m.num_classes,
        embed_dim=E, depths=tuple(depths), num_heads=tuple(heads), window_size=refs[0][0], mlp_ratio=ratio,
        qkv_bias=m.layers[0].blocks[0].attn.qkv.bias is not None, drop_rate=head.drop.p,
        attn_drop_rate=m.layers[0].blocks[0].attn.attn_drop.p,
        drop_path=float(f"{last.drop_prob:.7g}") if isinstance(last, DropPath) else 0.0,  # a float32 linspace
        norm_eps=eps.pop(), global_pool=pool,
        name=str(getattr(m, "pretrained_cfg", {}).get("architecture", "") or ""),
    )
    # what SwinConfig derives must be what timm built (set_input_size or always_partition change it)
    for i, (stage, grid, (ws, shift)) in enumerate(zip(m.layers, cfg.stage_grids, cfg.stage_windows)):
        for j, b in enumerate(stage.blocks):
            want = ((grid, grid), (ws, ws), (shift, shift) if j % 2 else (0, 0))
            got = (tuple(b.input_resolution), tuple(b.window_size), tuple(b.shift_size))
            if got != want:
                raise VitlabError(f"timm Swin layers.{i}.blocks.{j} has grid/window/shift {got}, where a "
                                  f"window_size={refs[0][0]} Swin has {want} (set_input_size or always_partition?)")
    return cfg


def swin_config_from_state_dict(state: dict[str, torch.Tensor], *, variant: str, image_size: int | None = None,
                                num_classes: int | None = None, global_pool: str | None = None,
                                **overrides) -> SwinConfig:
    """A SwinConfig for a bare timm Swin checkpoint: sizes from the vitlab `variant` ("swin-tiny"), the
    classifier size and qkv biases from its keys; wrong sizes surface as a strict-load error."""
    inferred: dict = dict(qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state)
    if num_classes is None:
        num_classes = int(state["head.fc.weight"].shape[0]) if "head.fc.weight" in state else 0
    inferred["num_classes"] = num_classes
    if image_size is not None:
        inferred["image_size"] = image_size
    if global_pool is not None:
        inferred["global_pool"] = global_pool
    return parse_swin_variant(variant, **{**inferred, **overrides})


def from_timm_swin_state_dict(state: dict[str, torch.Tensor], cfg: SwinConfig) -> SwinTransformer:
    """Our Swin with `cfg`, holding a timm SwinTransformer state dict (names are identical; strict)."""
    return load_into(SwinTransformer(cfg), dict(state), source="timm weights").eval()
