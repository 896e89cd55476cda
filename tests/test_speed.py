"""The fast paths compute the same thing as the plain ones."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vitlab.model import create_model
from vitlab.model.layers import sdpa
from vitlab.speed import (
    CPU_SLICE_BYTES,
    TrainStep,
    autocast,
    cache_chunk,
    inference_forward,
    resolve_precision,
    soft_cross_entropy,
)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_explicit_bf16_attention_equals_fused(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    m = None
    if mask == "bool":
        m = torch.ones(17, 17, dtype=torch.bool).tril()
    elif mask == "float":
        m = torch.randn(17, 17, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # fp32 fused reference
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))  # takes the explicit route
    out = sdpa(qb, kb, vb, attn_mask=m)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()  # and it has gradients
    assert qb.grad is not None and torch.isfinite(qb.grad.float()).all()


def test_soft_cross_entropy_matches_torch():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(soft_cross_entropy(logits, y), F.cross_entropy(logits, y))
    soft = torch.softmax(torch.randn(5, 4), -1)
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, soft))


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", device=cpu) == "fp32"
    assert resolve_precision("auto", device=cpu) in ("fp32", "bf16-pure")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", device=cpu)
    with pytest.raises(ValueError, match="resolved precision"):
        TrainStep(create_model("seed"), torch.optim.SGD(create_model("seed").parameters(), lr=0.1), precision="auto")


def _steps(precision, n=3):
    torch.manual_seed(0)
    model = create_model("seed", seed=0, depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, opt, precision=precision)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = [step(x, y)[0].item() for _ in range(n)]
    return model, losses


def test_bf16_pure_step_tracks_fp32_and_keeps_fp32_master_weights():
    ref, ref_losses = _steps("fp32")
    pure, losses = _steps("bf16-pure")
    assert all(p.dtype == torch.float32 for p in pure.parameters())  # the model holds the master weights
    assert losses[-1] < losses[0]  # it learns
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.05
    for (n, a), b in zip(ref.named_parameters(), pure.parameters()):
        # one AdamW step moves each weight by ~lr; bf16 gradients may flip tiny ones, never much more
        assert (a - b).abs().max() < 3 * 3e-3, n


def test_bf16_pure_sees_weight_changes_made_outside_the_step():
    model = create_model("seed", seed=0, depth=1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="bf16-pure")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)
    _, logits = step(x, y)
    torch.testing.assert_close(logits.float(), torch.ones(4, 10))


def test_inference_forward_precisions_agree():
    model = create_model("seed", seed=0).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for precision in ("fp32", "bf16", "bf16-pure"):
        out = inference_forward(copy.deepcopy(model), precision)(x)
        assert out.dtype == torch.float32
        tol = 1e-5 if precision == "fp32" else 5e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_pure_inference_in_cache_slices_equals_per_image_results():
    model = create_model("S/4", image_size=16, num_classes=10, seed=0, depth=2)
    chunk = cache_chunk(model, torch.device("cpu"))
    assert chunk == CPU_SLICE_BYTES // (model.cfg.num_tokens * model.cfg.width * 2)
    assert cache_chunk(create_model("seed", image_size=16), torch.device("meta")) > 10**9  # not CPU: no slicing
    fwd = inference_forward(model, "bf16-pure")
    x = torch.randn(chunk * 2 + 3, 3, 16, 16)  # two full slices and a remainder
    out = fwd(x)
    assert out.shape == (x.shape[0], 10) and out.dtype == torch.float32
    each = torch.cat([fwd(x[i:i + 1]) for i in range(0, x.shape[0], 37)] + [fwd(x[-1:])])
    idx = list(range(0, x.shape[0], 37)) + [x.shape[0] - 1]
    # bf16: kernels may pick other blockings for other batch sizes, so equal within bf16 rounding
    torch.testing.assert_close(out[idx], each, rtol=0.05, atol=0.05)
