"""The fused oneDNN linear (bias, GELU in the matmul) against plain torch math in fp32."""

import pytest
import torch
import torch.nn.functional as F

from vitlab.model import onednn
from vitlab.model.onednn import Linear

needs_op = pytest.mark.skipif(onednn._OP is None or not torch.backends.mkldnn.is_available(),
                              reason="torch built without oneDNN's linear op")


def _reference(x, layer, gelu):
    """fp32 autograd of F.linear (+ exact GELU) on the same bf16 values."""
    x32 = x.detach().float().requires_grad_()
    w32 = layer.weight.detach().float().requires_grad_()
    b32 = layer.bias.detach().float().requires_grad_() if layer.bias is not None else None
    y = F.linear(x32, w32, b32)
    return (F.gelu(y) if gelu else y), (x32, w32, b32)


@needs_op
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_forward_and_grads_match_fp32_math(gelu, bias):
    torch.manual_seed(0)
    layer = Linear(48, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(4, 65, 48).to(torch.bfloat16).requires_grad_()
    assert onednn._fused_ok(x, layer.weight)
    y = layer(x, gelu=gelu)
    ref, (x32, w32, b32) = _reference(x, layer, gelu)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # bf16 output: within a couple of bf16 rounding steps of the fp32 result
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1.6e-2)
    g = torch.randn_like(ref)
    y.backward(g.to(torch.bfloat16))
    ref.backward(g.to(torch.bfloat16).float())
    pairs = [(x.grad, x32.grad), (layer.weight.grad, w32.grad)] + ([(layer.bias.grad, b32.grad)] if bias else [])
    for got, want in pairs:
        assert got.dtype == torch.bfloat16
        err = (got.float() - want).norm() / want.norm()
        assert err < 1e-2, err  # relative error at bf16 precision


@needs_op
def test_fused_is_at_least_as_accurate_as_unfused_bf16():
    """GELU from the fp32 accumulator, not from a bf16-rounded pre-activation."""
    torch.manual_seed(1)
    layer = Linear(192, 768).to(torch.bfloat16)
    x = torch.randn(512, 192).to(torch.bfloat16)
    with torch.no_grad():
        fused = layer(x, gelu=True).float()
        unfused = F.gelu(F.linear(x, layer.weight, layer.bias)).float()
        ref, _ = _reference(x, layer, True)
    assert (fused - ref).abs().mean() <= (unfused - ref).abs().mean() * 1.05


def test_fp32_takes_plain_torch_bit_exactly():
    torch.manual_seed(2)
    layer = Linear(16, 32)
    x = torch.randn(3, 5, 16)
    assert not onednn._fused_ok(x, layer.weight)
    assert torch.equal(layer(x, gelu=True), F.gelu(F.linear(x, layer.weight, layer.bias)))
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_state_dict_is_nn_linear():
    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}


@needs_op
def test_residual_add_fused_forward_and_grads():
    torch.manual_seed(3)
    layer = Linear(48, 32).to(torch.bfloat16)
    x = torch.randn(4, 65, 48).to(torch.bfloat16).requires_grad_()
    r = torch.randn(4, 65, 32).to(torch.bfloat16).requires_grad_()
    y = layer(x, residual=r)
    ref, (x32, w32, b32) = _reference(x, layer, False)
    r32 = r.detach().float().requires_grad_()
    ref = ref + r32
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1.6e-2)
    g = torch.randn_like(ref).to(torch.bfloat16)
    y.backward(g)
    ref.backward(g.float())
    assert torch.equal(r.grad, g)  # the residual's gradient passes through untouched
    for got, want in [(x.grad, x32.grad), (layer.weight.grad, w32.grad), (layer.bias.grad, b32.grad)]:
        assert (got.float() - want).norm() / want.norm() < 1e-2
    with pytest.raises(ValueError):
        layer(x, gelu=True, residual=r)


@needs_op
@pytest.mark.parametrize("drop_path", [0.0, 0.1])
def test_bf16_vit_with_fused_layers_tracks_fp32(drop_path):
    """A whole bf16 ViT (fused linears, fused residuals or the plain path under stochastic depth) stays within
    bf16 precision of the same weights in fp32, forward and backward."""
    from vitlab.model import create_model

    model = create_model("seed", image_size=32, num_classes=10, seed=0, drop_path=drop_path)
    low = create_model("seed", image_size=32, num_classes=10, seed=0, drop_path=drop_path).to(torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    ref = model(x)
    torch.manual_seed(0)
    out = low(x.to(torch.bfloat16))
    assert (out.float() - ref).norm() / ref.norm() < 3e-2
    ref.square().sum().backward()
    out.float().square().sum().backward()
    for (name, p32), p16 in zip(model.named_parameters(), low.parameters()):
        err = (p16.grad.float() - p32.grad).norm() / (p32.grad.norm() + 1e-12)
        assert err < 0.1, (name, err)
