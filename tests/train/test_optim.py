"""AdamW parameter groups and the warmup + cosine schedule, against timm and hand-computed values."""

import math

import pytest
import torch

from vitlab.model import create_model
from vitlab.train.optim import WarmupCosine, create_optimizer, param_groups


def small_vit(**kw):
    return create_model("tutorial", seed=0, width=32, depth=2, heads=2, mlp_dim=64, **kw)


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "pooling": "map", "layerscale_init": 1e-5}])
def test_param_groups_match_timm(kw):
    timm_optim = pytest.importorskip("timm.optim")
    model = small_vit(**kw)
    ours = param_groups(model, weight_decay=0.05)
    ref = timm_optim.param_groups_weight_decay(model, weight_decay=0.05,
                                               no_weight_decay_list=model.no_weight_decay())
    ref_decay = {id(p) for g in ref if g["weight_decay"] > 0 for p in g["params"]}
    ref_no_decay = {id(p) for g in ref if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(p) for p in ours[0]["params"]} == ref_decay
    assert {id(p) for p in ours[1]["params"]} == ref_no_decay
    assert ours[0]["weight_decay"] == 0.05 and ours[1]["weight_decay"] == 0.0


def test_param_groups_by_name():
    model = small_vit()
    decay, no_decay = (set(g["names"]) for g in param_groups(model, weight_decay=0.1))
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias", "patch_embed.proj.bias"} <= no_decay
    assert decay == {n for n, p in model.named_parameters() if p.ndim >= 2} - {"cls_token", "pos_embed"}
    assert "patch_embed.proj.weight" in decay and "blocks.1.mlp.fc2.weight" in decay
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}


def test_adamw_decay_is_decoupled_and_skips_no_decay_params():
    """With zero gradients Adam's update is 0, so only the decoupled decay moves weights: p <- p (1 - lr wd)."""
    model = small_vit()
    opt = create_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"] * (1 - 0.1 * 0.5))
    for n in ("pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"):
        assert torch.equal(after[n], before[n]), n


def test_warmup_cosine_hand_computed():
    s = WarmupCosine(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert s(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(60) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert s(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert s(110) == pytest.approx(0.1)  # one past the last step: min_lr
    assert s(109) > 0.1 and s(109) < 0.1 + 1e-3
    lrs = [s(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup


def test_warmup_cosine_no_warmup_and_apply():
    s = WarmupCosine(base_lr=2e-3, total_steps=4)
    assert [round(s(i) / 2e-3, 6) for i in range(5)] == [1.0, round((1 + math.cos(math.pi / 4)) / 2, 6), 0.5,
                                                          round((1 + math.cos(3 * math.pi / 4)) / 2, 6), 0.0]
    opt = create_optimizer(small_vit(), lr=1.0, weight_decay=0.0)
    assert s.apply(opt, 2) == pytest.approx(1e-3)
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups)


def test_onecycle_is_convmixers_piecewise_linear_schedule():
    """ConvMixer's CIFAR schedule (np.interp over [0, 2/5, 4/5, 1] of the run -> [0, lr, lr/20, 0]) when the
    warmup is 2/5 of the run, as the Trainer gives it; a floor lifts the fall as for the other decays."""
    import numpy as np

    T, lr = 100, 0.01
    s = WarmupCosine(base_lr=lr, total_steps=T, warmup_steps=40, decay="onecycle")
    for step in range(40, T + 1):
        assert s(step) == pytest.approx(float(np.interp(step, [40, 80, 100], [lr, lr / 20, 0.0])), abs=1e-12), step
    assert s(39) == pytest.approx(lr) and s(19) == pytest.approx(lr / 2)  # the rise, as for the other decays
    floored = WarmupCosine(base_lr=1.0, total_steps=T, warmup_steps=40, min_lr=0.1, decay="onecycle")
    assert floored(80) == pytest.approx(0.1 + 0.9 / 20) and floored(100) == pytest.approx(0.1)


def test_adamw_is_fused_on_cpu_and_steps_as_the_plain_one():
    """The fused AdamW `create_optimizer` picks gives the for-loop AdamW's weights, step after step, given the
    same gradients (from a model's own backward they differ in the last bits, which Adam amplifies where the true
    gradient is zero, e.g. the key bias)."""
    model, ref = small_vit(), small_vit()
    opt = create_optimizer(model, lr=1e-2, weight_decay=0.05)
    plain = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"}
                               for g in param_groups(ref, weight_decay=0.05)], lr=1e-2, foreach=False)
    assert all(g["fused"] for g in opt.param_groups) and not any(g["fused"] for g in plain.param_groups)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
