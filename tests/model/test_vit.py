import math

import numpy as np
import pytest
import torch

import vitlab
from vitlab.model import VisionTransformer, create_model
from vitlab.model.posemb import resample_grid, sincos_2d


def timm_params(**kw) -> int:
    """Parameters of timm's VisionTransformer(**kw); skips (this test only) without timm."""
    timm = pytest.importorskip("timm")
    return sum(p.numel() for p in timm.models.vision_transformer.VisionTransformer(**kw).parameters())


def test_param_counts_equal_timm():
    assert create_model("Ti/4", image_size=32, num_classes=10).num_params() == timm_params(
        img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)
    assert create_model("tutorial").num_params() == timm_params(
        img_size=32, patch_size=4, num_classes=10, embed_dim=48, depth=4, num_heads=4, mlp_ratio=4)
    # The stated counts, which the timm numbers above must also equal.
    assert create_model("Ti/4", image_size=32, num_classes=10).num_params() == 5_362_762
    assert create_model("tutorial").num_params() == 119_194


@pytest.mark.parametrize("kw, timm_kw", [
    (dict(pooling="gap", reg_tokens=4), dict(global_pool="avg", reg_tokens=4)),
    (dict(pooling="map", class_token=False), dict(global_pool="map", class_token=False)),
    (dict(layerscale_init=1e-5, qkv_bias=False), dict(init_values=1e-5, qkv_bias=False)),
    (dict(pre_norm=True, pos_embed_prefix=False), dict(pre_norm=True, no_embed_class=True)),
])
def test_param_counts_equal_timm_options(kw, timm_kw):
    ours = create_model("tutorial", **kw).num_params()
    assert ours == timm_params(img_size=32, patch_size=4, num_classes=10, embed_dim=48, depth=4, num_heads=4,
                               **timm_kw)


def _seed_input(b=2, size=32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_attention_maps_equal_plain_softmax_and_fused_path():
    model = create_model("tutorial", seed=0, reg_tokens=2).eval()
    x = _seed_input()
    captured = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
             for blk in model.blocks]
    with torch.no_grad():
        logits_fused = model(x)
        captured.clear()
        logits, attns = model(x, return_attention=True)
    for h in hooks:
        h.remove()
    assert len(attns) == model.cfg.depth
    assert attns[0].shape == (2, 4, 67, 67)
    torch.testing.assert_close(logits, logits_fused, atol=1e-5, rtol=0)
    for blk, inp, a in zip(model.blocks, captured, attns):
        # softmax(Q K^T / sqrt(d)) written out per head from the raw qkv weights.
        W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        D, H = model.cfg.width, model.cfg.heads
        d = D // H
        for h in range(H):
            q = inp @ W[h * d:(h + 1) * d].T + b[h * d:(h + 1) * d]
            k = inp @ W[D + h * d:D + (h + 1) * d].T + b[D + h * d:D + (h + 1) * d]
            ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            torch.testing.assert_close(a[:, h], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def test_seeded_init_is_reproducible_and_matches_timm_scheme():
    a, b, c = (create_model("Ti/4", image_size=32, num_classes=10, seed=s) for s in (1, 1, 2))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.blocks[0].mlp.fc1.weight, c.blocks[0].mlp.fc1.weight)
    w = torch.cat([blk.mlp.fc1.weight.flatten() for blk in a.blocks])
    assert abs(w.std().item() - 0.02) < 0.001  # timm: trunc_normal_(std=.02), bounds +-2 absolute
    assert a.cls_token.abs().max() < 1e-4
    assert torch.count_nonzero(a.blocks[3].attn.qkv.bias) == 0
    assert torch.all(a.blocks[0].norm1.weight == 1)


def test_other_input_size_resamples_positions_like_timm():
    resample_abs_pos_embed = pytest.importorskip("timm.layers").resample_abs_pos_embed

    pos = torch.randn(1, 64, 48)
    ours = resample_grid(pos, (8, 8), (12, 10))
    ref = resample_abs_pos_embed(pos, new_size=[12, 10], old_size=[8, 8], num_prefix_tokens=0)
    torch.testing.assert_close(ours, ref)
    model = create_model("tutorial", seed=0).eval()
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, 10)


def test_sincos_2d_is_big_vision_formula():
    h, w, dim = 3, 5, 16
    pe = sincos_2d(h, w, dim).numpy()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4 - 1))
    for idx in range(h * w):
        yy, xx = divmod(idx, w)
        ref = np.concatenate([np.sin(xx * omega), np.cos(xx * omega), np.sin(yy * omega), np.cos(yy * omega)])
        np.testing.assert_allclose(pe[idx], ref, atol=1e-6)
    model = create_model("tutorial", pos_embed="sincos2d", class_token=False, pooling="gap")
    assert "pos_embed" not in model.state_dict()  # fixed: rebuilt, not saved
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_save_and_load_pretrained_exact(tmp_path):
    model = create_model("tutorial", seed=3, reg_tokens=1, pooling="map", class_token=False, layerscale_init=0.1)
    model.save_pretrained(tmp_path, class_names=[f"c{i}" for i in range(10)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VisionTransformer.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = _seed_input()
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)
    assert VisionTransformer.read_class_names(tmp_path) == [f"c{i}" for i in range(10)]


def test_from_pretrained_refuses_mismatch_and_pickles(tmp_path):
    create_model("tutorial").save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"depth": 4', '"depth": 5')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.4\."):
        VisionTransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only .safetensors"):
        vitlab.weights.load_state_dict(tmp_path / "model.pth")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = create_model("tutorial", seed=0).train()
    x = _seed_input(4)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for g1, g2 in zip(plain, grads()):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    model = create_model("tutorial", drop_path=0.5, seed=0)
    blk = model.blocks[-1]
    assert blk.drop_path1.p == pytest.approx(0.5) and model.blocks[0].drop_path1.__class__.__name__ == "Identity"
    x = torch.ones(512, 3, 4)
    y = blk.drop_path1.train()(x)
    kept = (y[:, 0, 0] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and torch.all((y == 0) | (y == 2))
    assert torch.equal(blk.drop_path1.eval()(x), x)


def test_no_weight_decay_names_exist():
    model = create_model("tutorial", reg_tokens=2)
    names = dict(model.named_parameters())
    assert {"pos_embed", "cls_token", "reg_token"} <= model.no_weight_decay()
    assert {"pos_embed", "cls_token", "reg_token"} <= set(names)
