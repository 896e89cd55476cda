"""timm interop: outputs of converted models against the real timm VisionTransformer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

from vitlab.convert import from_timm, timm_kwargs, to_timm  # noqa: E402
from vitlab.convert.timm import (  # noqa: E402
    from_timm_state_dict,
    load_timm_checkpoint,
    timm_config,
    timm_config_from_state_dict,
)
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.model import VisionTransformer, ViTConfig  # noqa: E402

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_classes=5)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# Each: (id, ViTConfig overrides, extra input sizes (H, W) to check with dynamic_img_size).
CASES = [
    ("cls", {}, [(40, 56), (16, 24)]),
    ("gap", dict(pooling="gap", class_token=False), [(48, 40)]),
    ("gap_with_cls", dict(pooling="gap"), []),
    ("map", dict(pooling="map", class_token=False), [(40, 40)]),
    ("map_cls_tanh", dict(pooling="map", activation="gelu_tanh"), []),
    ("no_qkv_bias", dict(qkv_bias=False), []),
    ("reg_in_pos", dict(reg_tokens=2), [(48, 32)]),
    ("reg_no_embed_class", dict(reg_tokens=4, pos_embed_prefix=False, pooling="gap", class_token=False),
     [(40, 56)]),
    ("layerscale", dict(layerscale_init=0.1, pos_embed_prefix=False), []),
    ("clip_pre_norm", dict(pre_norm=True, activation="quick_gelu", norm_eps=1e-5), [(40, 56)]),
    ("gelu_tanh", dict(activation="gelu_tanh"), []),
    ("size48_patch8", dict(image_size=48), [(32, 64)]),
    ("size40_patch5", dict(image_size=40, patch_size=5, heads=4), [(40, 55), (25, 30)]),
    ("headless", dict(num_classes=0), []),
    ("no_pos_embed", dict(pos_embed="none"), [(40, 56)]),
    ("no_final_norm", dict(final_norm=False), []),
    ("cls_fc_norm", dict(fc_norm=True), []),
]


@pytest.mark.parametrize("overrides,sizes", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parity_both_directions(overrides, sizes, perturb):
    cfg = ViTConfig(**{**TINY, **overrides})
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)

    # timm -> vitlab: the config is read back exactly, outputs match.
    theirs = perturb(TimmViT(**timm_kwargs(cfg)), seed=0)
    ours = from_timm(theirs)
    # (a trained LayerScale gamma no longer tells its init value; only its presence must survive)
    assert dataclasses.replace(ours.cfg, layerscale_init=cfg.layerscale_init) == cfg
    assert bool(ours.cfg.layerscale_init) == bool(cfg.layerscale_init)
    with torch.no_grad():
        close(ours.forward_features(x), theirs.forward_features(x))
        close(ours(x), theirs(x))
        for h, w in sizes:  # other input sizes: both resample positions bicubically (dynamic_img_size)
            xs = torch.randn(2, cfg.in_channels, h, w)
            close(ours(xs), theirs(xs))

    # vitlab -> timm: a strict load into a fresh timm model gives the same outputs.
    ours = perturb(VisionTransformer(cfg), seed=1)
    back = TimmViT(**timm_kwargs(cfg)).eval()
    back.load_state_dict(to_timm(ours), strict=True)
    with torch.no_grad():
        close(back.forward_features(x), ours.forward_features(x))
        close(back(x), ours(x))


@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "deit3_small_patch16_224",
                                  "vit_base_patch16_clip_quickgelu_224", "vit_medium_patch16_reg4_gap_256",
                                  "vit_base_patch16_siglip_224"])
def test_registered_timm_architectures(arch, perturb):
    """timm's own model definitions (shrunk), not configs we wrote: CLIP, DeiT-3, registers + GAP, SigLIP."""
    tm = perturb(timm.create_model(arch, pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=32,
                                   patch_size=8, num_classes=3))
    ours = from_timm(tm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(ours.forward_features(x), tm.forward_features(x))
        close(ours(x), tm(x))


def test_sincos_exports_as_learned_table(perturb):
    cfg = ViTConfig(**TINY, pos_embed="sincos2d", pooling="gap")
    ours = perturb(VisionTransformer(cfg))
    kw = timm_kwargs(cfg)
    assert kw["pos_embed"] == "learn" and kw["no_embed_class"]
    tm = TimmViT(**kw).eval()
    tm.load_state_dict(to_timm(ours), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(tm(x), ours(x))
        # and back: the exported table is recognised as the fixed sincos one
        close(from_timm_state_dict(to_timm(ours), cfg)(x), ours(x))
    state = to_timm(ours)
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(VitlabError, match="sincos2d"):
        from_timm_state_dict(state, cfg)


@pytest.mark.parametrize("overrides,words", [
    (dict(pre_logits_dim=16), "pre_logits_dim"),
    (dict(pre_norm=True, patch_bias=True), "patch_bias"),
    (dict(patch_bias=False), "patch_bias"),
    (dict(width=56, heads=2, mlp_dim=61), "mlp_dim"),
])
def test_timm_kwargs_refuses_what_timm_cannot_express(overrides, words):
    with pytest.raises(VitlabError, match=words):
        timm_kwargs(ViTConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("kw,words", [
    (dict(qk_norm=True), "q_norm"),
    (dict(global_pool="avgmax"), "global_pool"),
    (dict(norm_layer="rmsnorm"), "LayerNorm"),
    (dict(act_layer="silu"), "SiLU"),
])
def test_from_timm_refuses_unsupported_models(kw, words):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(VitlabError, match=words):
        from_timm(TimmViT(**{**base, **kw}))


def test_from_timm_refuses_other_model_classes():
    tm = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, embed_dim=32, depth=1,
                           num_heads=2, img_size=32, patch_size=8)  # relative positions: no vitlab twin
    with pytest.raises(VitlabError, match="VisionTransformerRelPos"):
        from_timm(tm)


def test_state_dict_mismatch_lists_every_problem():
    cfg = ViTConfig(**TINY)
    state = TimmViT(**timm_kwargs(cfg)).state_dict()
    del state["blocks.1.norm2.bias"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    state["head.weight"] = torch.zeros(7, 32)
    with pytest.raises(VitlabError) as e:
        from_timm_state_dict(state, cfg)
    msg = str(e.value)
    for words in ("missing keys: blocks.1.norm2.bias", "unexpected keys: blocks.0.attn.q_norm.weight",
                  "head.weight: file (7, 32) vs model (5, 32)"):
        assert words in msg


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(pooling="gap", class_token=False, reg_tokens=4, pos_embed_prefix=False, layerscale_init=1e-5),
    dict(pooling="map", qkv_bias=False, num_classes=0),
    dict(pre_norm=True, reg_tokens=1),
], ids=["cls", "reg_gap_ls", "map", "pre_norm"])
def test_config_inferred_from_checkpoint_keys(overrides, perturb):
    """A bare timm checkpoint + a vitlab variant string gives back the config it was made with."""
    cfg = dataclasses.replace(ViTConfig(**{**TINY, "width": 48, "depth": 4, "heads": 4, "mlp_dim": 192,
                                           "patch_size": 4, "num_classes": 10}), **overrides)
    tm = perturb(TimmViT(**timm_kwargs(cfg)))
    state = tm.state_dict()
    inferred = timm_config_from_state_dict(state, variant="tutorial")  # image size from the pos_embed length
    assert dataclasses.replace(inferred, name="") == cfg
    assert timm_config_from_state_dict(state, variant="tutorial", image_size=32) == inferred
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(from_timm_state_dict(state, inferred)(x), tm(x))


def test_global_pool_hint_decides_what_keys_cannot():
    cfg = ViTConfig(**TINY, pooling="gap", fc_norm=False)  # keys look exactly like cls pooling
    state = TimmViT(**timm_kwargs(cfg)).state_dict()
    guessed = timm_config_from_state_dict(state, variant="tutorial", patch_size=8, width=32, depth=2, heads=2,
                                          mlp_dim=64)
    assert guessed.pooling == "cls"
    told = timm_config_from_state_dict(state, variant="tutorial", global_pool="avg", patch_size=8, width=32,
                                       depth=2, heads=2, mlp_dim=64)
    assert told.pooling == "gap" and not told.use_fc_norm


def test_load_timm_checkpoint_from_hub_style_config(perturb):
    tm = perturb(timm.create_model("vit_medium_patch16_reg4_gap_256", pretrained=False, embed_dim=32, depth=2,
                                   num_heads=2, img_size=32, patch_size=8, num_classes=4))
    config = {"architecture": "vit_medium_patch16_reg4_gap_256", "num_classes": 4,
              "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [32, 32],
                             "patch_size": 8}}
    ours = load_timm_checkpoint(tm.state_dict(), config)
    assert ours.cfg == timm_config(tm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(ours(x), tm(x))
    with pytest.raises(VitlabError, match="do not match timm"):
        load_timm_checkpoint(tm.state_dict(), {**config, "num_classes": 7})
