"""fuse_for_cpu_bf16: the module swap keeps the state dict and computes what the plain model computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vitlab.model import create_model
from vitlab.model.vit import Attention, Block, Mlp
from vitlab.speed import fuse_for_cpu_bf16
from vitlab.speed.cpu_bf16 import FusedAttention, FusedBlock, FusedMlp, explicit_attention


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_swap_changes_classes_not_state():
    model = create_model("tutorial", seed=0, pooling="map", class_token=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_cpu_bf16(copy.deepcopy(model))
    assert all(type(b) is FusedBlock for b in fused.blocks)
    assert type(fused.blocks[0].attn) is FusedAttention and type(fused.attn_pool.mlp) is FusedMlp
    assert not any(type(m) in (Block, Attention, Mlp) for m in fused.modules())
    assert fused.state_dict().keys() == before.keys()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())


MAP = {"pooling": "map", "class_token": False}


@pytest.mark.parametrize("kw", [{}, {"drop_path": 0.1}, {"layerscale_init": 0.1}, MAP])
def test_fused_fp32_model_equals_plain_bit_exactly(kw):
    model = create_model("tutorial", seed=0, **kw).eval()
    fused = fuse_for_cpu_bf16(copy.deepcopy(model))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


@pytest.mark.parametrize("kw", [{}, {"drop_path": 0.1}, {"layerscale_init": 0.1}])
def test_fused_bf16_model_matches_plain_bf16_forward_and_grads(kw):
    """Training mode (explicit attention, fused linears and residuals): the same function as the plain bf16
    model, within bf16 rounding of fp32, and per parameter no further from fp32 than plain bf16 is (a few
    LayerNorm biases have small, cancelling gradients that bf16 gets ~50% wrong either way)."""
    ref = create_model("tutorial", seed=0, **kw).train()
    plain = copy.deepcopy(ref).bfloat16()
    fused = fuse_for_cpu_bf16(copy.deepcopy(ref).bfloat16())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    outs = {}
    for name, m in (("ref", ref), ("plain", plain), ("fused", fused)):
        torch.manual_seed(0)  # the same drop-path masks
        out = m(x if name == "ref" else x.bfloat16())
        F.cross_entropy(out.float(), y).backward()
        outs[name] = out
    assert _rel(outs["fused"], outs["ref"]) < 2e-2
    grads = {name: torch.cat([p.grad.float().flatten() for p in m.parameters()])
             for name, m in (("ref", ref), ("plain", plain), ("fused", fused))}
    assert _rel(grads["fused"], grads["ref"]) < 2e-2
    for (n, p_ref), p_plain, p_fused in zip(ref.named_parameters(), plain.parameters(), fused.parameters()):
        e_plain, e_fused = _rel(p_plain.grad, p_ref.grad), _rel(p_fused.grad, p_ref.grad)
        assert e_fused < 1.25 * e_plain + 0.01, (n, e_fused, e_plain)


def test_fused_model_still_returns_attention():
    model = create_model("tutorial", seed=0).eval()
    fused = fuse_for_cpu_bf16(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (lo, ao), (lf, af) = model(x, return_attention=True), fused(x, return_attention=True)
    assert torch.equal(lo, lf) and all(torch.equal(a, b) for a, b in zip(ao, af))


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_explicit_bf16_attention_matches_fp32_sdpa(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    m = {"bool": torch.ones(17, 17, dtype=torch.bool).tril(), "float": torch.randn(17, 17, generator=g),
         None: None}[mask]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=m, dropout_p=0.0)
    assert _rel(out, ref) < 1e-2


def test_swin_window_attention_is_swapped_and_computes_the_same():
    """Swin's WindowAttention: fp32 bit-exact; bf16 training forward and grads as close to fp32 as plain bf16."""
    from vitlab.model.swin import WindowAttention
    from vitlab.speed.cpu_bf16 import FusedWindowAttention

    ref = create_model("swin-test", seed=0, num_classes=10).train()
    fused32 = fuse_for_cpu_bf16(copy.deepcopy(ref))
    assert not any(type(m) in (WindowAttention, Mlp) for m in fused32.modules())
    assert sum(type(m) is FusedWindowAttention for m in fused32.modules()) == 2
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.equal(fused32.eval()(x), ref.eval()(x))
    ref.train()
    plain, fused = copy.deepcopy(ref).bfloat16(), fuse_for_cpu_bf16(copy.deepcopy(ref).bfloat16())
    outs, grads = {}, {}
    for name, m in (("ref", ref), ("plain", plain), ("fused", fused)):
        out = m(x if name == "ref" else x.bfloat16())
        F.cross_entropy(out.float(), y).backward()
        outs[name] = out
        grads[name] = torch.cat([p.grad.float().flatten() for p in m.parameters()])
    assert _rel(outs["fused"], outs["ref"]) < 2e-2
    assert _rel(grads["fused"], grads["ref"]) < max(2e-2, 1.5 * _rel(grads["plain"], grads["ref"]))
