"""The fused oneDNN linear (bias, GELU or residual in the matmul) against plain torch math in fp32."""

import pytest
import torch
import torch.nn.functional as F

from vitlab.speed import onednn

needs_op = pytest.mark.skipif(onednn._OP is None or not torch.backends.mkldnn.is_available(),
                              reason="torch built without oneDNN's linear op")


def _bf16_linear(d_in, d_out, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).bfloat16().requires_grad_()
    b = (torch.randn(d_out, generator=g) * 0.1).bfloat16().requires_grad_() if bias else None
    return w, b


def _reference(x, w, b, gelu):
    """fp32 autograd of F.linear (+ exact GELU) on the same bf16 values."""
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_() if b is not None else None
    y = F.linear(x32, w32, b32)
    return (F.gelu(y) if gelu else y), (x32, w32, b32)


def _rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


@needs_op
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_forward_and_grads_match_fp32_math(gelu, bias):
    w, b = _bf16_linear(48, 96, bias)
    x = torch.randn(4, 65, 48).bfloat16().requires_grad_()
    assert onednn.fused_ok(x, w)
    y = onednn.linear(x, w, b, gelu=gelu)
    ref, (x32, w32, b32) = _reference(x, w, b, gelu)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1.6e-2)  # a couple of bf16 rounding steps
    g = torch.randn_like(ref).bfloat16()
    y.backward(g)
    ref.backward(g.float())
    for got, want in [(x.grad, x32.grad), (w.grad, w32.grad)] + ([(b.grad, b32.grad)] if bias else []):
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < 1e-2  # relative error at bf16 precision


@needs_op
def test_fused_gelu_is_at_least_as_accurate_as_unfused_bf16():
    """GELU from the fp32 accumulator, not from a bf16-rounded pre-activation."""
    w, b = _bf16_linear(192, 768, seed=1)
    x = torch.randn(512, 192).bfloat16()
    with torch.no_grad():
        fused = onednn.linear(x, w, b, gelu=True).float()
        unfused = F.gelu(F.linear(x, w, b)).float()
        ref, _ = _reference(x, w, b, True)
    assert (fused - ref).abs().mean() <= (unfused - ref).abs().mean() * 1.05


@needs_op
def test_residual_add_fused_forward_and_grads():
    w, b = _bf16_linear(48, 32, seed=3)
    x = torch.randn(4, 65, 48).bfloat16().requires_grad_()
    r = torch.randn(4, 65, 32).bfloat16().requires_grad_()
    y = onednn.linear(x, w, b, residual=r)
    ref, (x32, w32, b32) = _reference(x, w, b, False)
    r32 = r.detach().float().requires_grad_()
    ref = ref + r32
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1.6e-2)
    g = torch.randn_like(ref).bfloat16()
    y.backward(g)
    ref.backward(g.float())
    assert torch.equal(r.grad, g)  # the residual's gradient passes through untouched
    for got, want in [(x.grad, x32.grad), (w.grad, w32.grad), (b.grad, b32.grad)]:
        assert _rel(got, want) < 1e-2
    with pytest.raises(ValueError):
        onednn.linear(x, w, b, gelu=True, residual=r)


def test_fp32_takes_plain_torch_bit_exactly():
    w, b = torch.randn(32, 16), torch.randn(32)
    x = torch.randn(3, 5, 16)
    assert not onednn.fused_ok(x, w)
    assert torch.equal(onednn.linear(x, w, b, gelu=True), F.gelu(F.linear(x, w, b)))
    assert torch.equal(onednn.linear(x, w, b), F.linear(x, w, b))
    r = torch.randn(3, 5, 32)
    assert torch.equal(onednn.linear(x, w, b, residual=r), r + F.linear(x, w, b))
