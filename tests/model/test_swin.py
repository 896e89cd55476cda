"""The Swin Transformer against timm's SwinTransformer (the reference implementation of the same layout): the
same state dict loads both ways and every output agrees on random, non-trivial weights, for the variants and for
grids that the window does not divide, stages smaller than the window, odd grids and other options."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from helpers import randomise
from vitlab.errors import VitlabError
from vitlab.model import SwinConfig, SwinTransformer, create_model, flops_per_image, load_pretrained, model_config
from vitlab.model.flops import estimate_params, stem_macs
from vitlab.model.swin import SWIN_VARIANTS, parse_swin_variant

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformer as TimmSwin  # noqa: E402

from vitlab.convert.timm_swin import swin_timm_kwargs  # noqa: E402

# (id, SwinConfig fields): each stresses one part of the layout
CASES = {
    "swin-test": parse_swin_variant("swin-test"),
    "swin-cifar": parse_swin_variant("swin-cifar"),
    # grid 20 with window 6: padded to 24 after the roll (timm's order), the mask is the padded grid's;
    # stage 1 grid 10 pads to 12; stage 2 grid 5 is smaller than the window: one 5x5 window, no shift
    "window_does_not_divide": SwinConfig(image_size=40, patch_size=2, embed_dim=16, depths=(2, 2, 2),
                                         num_heads=(2, 2, 4), window_size=6, num_classes=7),
    # grids 8, 4, 2 with window 4: stage 1 is exactly one window (no shift), stage 2's window clamps to 2
    "window_clamped": SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                                 window_size=4, num_classes=3),
    # odd grids 7 -> 4 -> 2: patch merging pads; window 3 pads 7 to 9
    "odd_grid": SwinConfig(image_size=21, patch_size=3, embed_dim=12, depths=(2, 2, 2), num_heads=(3, 3, 3),
                           window_size=3, num_classes=4),
    "options": SwinConfig(image_size=32, patch_size=2, embed_dim=24, depths=(1, 3), num_heads=(2, 6), window_size=4,
                          mlp_ratio=2.5, qkv_bias=False, norm_eps=1e-6, global_pool="max", num_classes=6),
    "avgmax_headless": SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4),
                                  window_size=4, global_pool="avgmax", num_classes=0),
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def timm_twin(cfg: SwinConfig, seed: int = 0, *, dynamic: bool = False) -> TimmSwin:
    """timm's model for `cfg`, strict about the input size (its default: masks are buffers) unless `dynamic`."""
    m = TimmSwin(**{**swin_timm_kwargs(cfg), "dynamic_img_size": dynamic})
    for blk in m.modules():  # timm's explicit softmax (its default), whose probabilities we compare
        if hasattr(blk, "fused_attn"):
            blk.fused_attn = False
    return randomise(m, seed)


def images(cfg: SwinConfig, n: int = 2) -> torch.Tensor:
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_timm_state_dict_loads_and_outputs_match(cfg):
    theirs = timm_twin(cfg)
    ours = SwinTransformer(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    # the buffers timm builds (index, masks) are ours too, value for value, and neither is saved
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf, atol=0, rtol=0)
    x = images(cfg)
    with torch.no_grad():
        feats = ours.forward_features(x)
        close(feats, theirs.forward_features(x))
        assert feats.shape[1:] == (cfg.stage_grids[-1], cfg.stage_grids[-1], cfg.num_features)
        close(ours(x), theirs(x))
        close(ours.forward_head(feats, pre_logits=True), theirs.forward_head(feats, pre_logits=True))
        close(ours.forward_attention(x)[0], theirs(x))  # the explicit-softmax path too
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == estimate_params(cfg)
    assert ours.no_weight_decay() == theirs.no_weight_decay() and ours.no_weight_decay()

    # and back: our random weights load into timm and give its outputs
    mine = randomise(SwinTransformer(cfg), seed=3)
    back = timm_twin(cfg)
    back.load_state_dict(mine.state_dict(), strict=True)
    with torch.no_grad():
        close(mine(x), back(x))


@pytest.mark.parametrize("case, sizes", [("swin-test", [(48, 40), (16, 16)]),
                                         ("window_does_not_divide", [(36, 52)]), ("window_clamped", [(48, 48)])])
def test_other_input_sizes_match_timms_dynamic_size(case, sizes):
    """Windows stay those of image_size (a stage may now pad), the shifted-window masks are built per call."""
    cfg = CASES[case]
    theirs = timm_twin(cfg, dynamic=True)
    ours = SwinTransformer(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            close(ours(x), theirs(x))
            logits, attns = ours.forward_attention(x)
        close(logits, theirs(x))
        want = hooked_probabilities(theirs, x)
        close(torch.cat([a.flatten() for a in attns]), torch.cat([p.flatten() for p in want]))


def test_swin_tiny_matches_timm_swin_tiny():
    """timm's registered swin_tiny_patch4_window7_224 (224 px, grids 56/28/14/7, last stage one 7x7 window)."""
    theirs = randomise(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), seed=5)
    ours = create_model("swin-tiny").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(ours(x), theirs(x))


@pytest.mark.parametrize("name, arch", [("swin-tiny", "swin_tiny_patch4_window7_224"),
                                        ("swin-small", "swin_small_patch4_window7_224"),
                                        ("swin-base", "swin_base_patch4_window7_224")])
def test_variants_are_timm_sizes(name, arch):
    with torch.device("meta"):  # shapes only
        theirs = timm.create_model(arch, pretrained=False)
        ours = create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.num_params() == estimate_params(ours.cfg)


def hooked_probabilities(theirs: TimmSwin, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's softmax outputs, block by block, captured from its explicit attention path."""
    seen: list[torch.Tensor] = []
    hooks = [blk.attn.softmax.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for stage in theirs.layers for blk in stage.blocks]
    with torch.no_grad():
        theirs(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("case", ["swin-test", "window_does_not_divide", "window_clamped"])
def test_forward_attention_gives_timms_window_probabilities(case):
    cfg = CASES[case]
    theirs = timm_twin(cfg)
    ours = SwinTransformer(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    x = images(cfg)
    with torch.no_grad():
        logits, attns = ours.forward_attention(x)
    close(logits, ours(x))
    layout = ours.block_layout()
    want = hooked_probabilities(theirs, x)
    assert len(attns) == len(layout) == len(want) == sum(cfg.depths)
    blocks = [b for stage in theirs.layers for b in stage.blocks]
    for a, w, info, blk in zip(attns, want, layout, blocks):
        ws = info["window"]
        n_windows = (-(-info["grid"][0] // ws)) ** 2
        assert a.shape == (2, n_windows, info["heads"], ws * ws, ws * ws)
        close(a.reshape(w.shape), w)
        assert info["grid"] == tuple(blk.input_resolution)
        assert (info["window"], info["window"]) == tuple(blk.window_size)
        assert (info["shift"], info["shift"]) == tuple(blk.shift_size)
        assert info["heads"] == blk.attn.num_heads
    assert [(d["stage"], d["block"]) for d in layout] == [(i, j) for i, d in enumerate(cfg.depths) for j in range(d)]


def test_block_layout_clamps_windows_as_timm():
    layout = SwinTransformer(CASES["window_clamped"]).block_layout()
    assert [(d["grid"], d["window"], d["shift"]) for d in layout] == [
        ((8, 8), 4, 0), ((8, 8), 4, 2), ((4, 4), 4, 0), ((4, 4), 4, 0), ((2, 2), 2, 0), ((2, 2), 2, 0)]


@pytest.mark.parametrize("kw", [dict(), dict(indices=2), dict(indices=[0, -1], norm=True),
                                dict(indices=[1], stop_early=True), dict(indices=1, intermediates_only=True)])
def test_forward_intermediates_match_timm(kw):
    cfg = CASES["window_clamped"]
    theirs = timm_twin(cfg)
    ours = SwinTransformer(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    x = images(cfg)
    with torch.no_grad():
        got, want = ours.forward_intermediates(x, **kw), theirs.forward_intermediates(x, **kw)
    if not kw.get("intermediates_only"):
        close(got[0], want[0])
        got, want = got[1], want[1]
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.shape[1] in cfg.stage_dims  # NCHW
        close(a, b)


def test_forward_intermediates_refuses_bad_indices():
    model = create_model("swin-test")
    for bad in (3, [2], [-3], 0):
        with pytest.raises(VitlabError, match="out of range"):
            model.forward_intermediates(images(model.cfg), indices=bad)


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = CASES["window_clamped"]  # shifted and unshifted blocks, merging; no dropout, so both runs agree
    model = randomise(SwinTransformer(cfg)).train()
    x = images(cfg)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)
    assert all(s.grad_checkpointing for s in model.layers)


def test_get_classifier_and_headless_features():
    model = create_model("swin-test", num_classes=0).eval()
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert model(images(model.cfg)).shape == (2, model.cfg.num_features)
    assert create_model("swin-test").get_classifier().out_features == 10


def test_create_model_and_round_trip_through_files(tmp_path):
    model = vitlab.create_model("swin-cifar", num_classes=10, seed=0)
    assert isinstance(model, SwinTransformer) and model.cfg.name == "swin-cifar"
    assert model.cfg == model_config("swin-cifar", num_classes=10)
    randomise(model)
    model.save_pretrained(tmp_path / "m", class_names=[f"c{i}" for i in range(10)])
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "vitlab_swin" and saved["depths"] == list(model.cfg.depths)
    for loaded in (SwinTransformer.from_pretrained(tmp_path / "m"), load_pretrained(tmp_path / "m")):
        assert isinstance(loaded, SwinTransformer) and loaded.cfg == model.cfg
        x = images(model.cfg)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert SwinTransformer.read_class_names(tmp_path / "m")[3] == "c3"
    # the same seed builds the same weights
    a, b = create_model("swin-test", seed=1), create_model("swin-test", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_summary_is_one_line():
    line = create_model("swin-test").summary()
    assert "\n" not in line and line.startswith("swin-test 16w 1-1d 1-2h /2 w4 32px (")


BAD = [
    (dict(embed_dim=20, num_heads=(3, 6)), "not divisible by its 3 heads"),
    (dict(depths=(1, 1, 1)), "one entry per stage"),
    (dict(image_size=33), "not divisible by patch_size"),
    (dict(window_size=0), "window_size must be a positive integer"),
    (dict(depths=(1, 0)), "depths must be positive"),
    (dict(global_pool="token"), "global_pool 'token' unknown"),
    (dict(drop_path=1.0), r"drop_path must be in \[0, 1\)"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be > 0"),
]


@pytest.mark.parametrize("kw, msg", BAD)
def test_bad_configs_fail_with_one_line(kw, msg):
    with pytest.raises(VitlabError, match=msg) as e:
        model_config("swin-test", **kw)
    assert "\n" not in str(e.value)


def test_unknown_names_and_wrong_inputs_fail_with_one_line():
    for call, msg in [(lambda: model_config("swin-huge"), "unknown Swin variant 'swin-huge'"),
                      (lambda: model_config("swin-test", width=3), "unknown SwinConfig fields"),
                      (lambda: model_config("swin-test", depths="2"), "field 'depths' must be a list"),
                      (lambda: create_model("swin-test")(torch.zeros(1, 3, 33, 32)), "input 33x32 is not divisible"),
                      (lambda: SwinConfig.from_dict({"embed_dim": 16, "layers": 2}), "unknown SwinConfig fields")]:
        with pytest.raises(VitlabError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


def test_variant_table_builds():
    for name in SWIN_VARIANTS:
        cfg = model_config(name)
        assert cfg.name == name and isinstance(cfg, SwinConfig)
    cifar = model_config("swin-cifar")
    assert (cifar.image_size, cifar.patch_size, cifar.window_size, cifar.num_classes) == (32, 2, 4, 10)


# ---- cost model against torch's own counter ----------------------------------------------------------
def counted_flops(cfg: SwinConfig, *, training: bool, batch: int = 2) -> float:
    """FLOPs per image FlopCounterMode sees (explicit attention: the counter cannot see inside CPU fused SDPA)."""
    model = SwinTransformer(cfg).train(training).requires_grad_(training)
    with FlopCounterMode(display=False) as counter:
        logits, _ = model.forward_attention(images(cfg, batch))
        if training:
            logits.logsumexp(-1).sum().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("case", ["swin-test", "swin-cifar", "window_does_not_divide", "odd_grid", "options"])
def test_flops_match_torch_flop_counter(case):
    cfg = CASES[case]
    assert flops_per_image(cfg) == pytest.approx(counted_flops(cfg, training=False), rel=1e-9)  # every matmul


def test_training_flops_are_forward_plus_backward():
    cfg = CASES["swin-cifar"]
    measured = counted_flops(cfg, training=True)
    # backward is two matmuls per forward one, except the stem's: the images need no gradient
    assert measured == pytest.approx(3 * counted_flops(cfg, training=False) - 2 * stem_macs(cfg), rel=1e-9)
    assert abs(flops_per_image(cfg, training=True) - measured) / measured < 0.02
