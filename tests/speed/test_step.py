"""TrainStep and inference_forward in every precision compute what fp32 computes, within bf16 rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vitlab.model import create_model
from vitlab.speed import (
    CPU_SLICE_BYTES,
    TrainStep,
    autocast,
    cache_chunk,
    inference_forward,
    resolve_precision,
    soft_cross_entropy,
)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class GradRecorder(torch.optim.Optimizer):
    """An optimizer that records the gradients it is given and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


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
    model = create_model("tutorial")
    with pytest.raises(ValueError, match="resolved precision"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="auto")


def _step_grads(precision, **kw):
    """The fp32 master gradients one TrainStep hands the optimizer, for a fixed model and batch."""
    model = create_model("tutorial", seed=0, **kw)
    opt = GradRecorder(model.parameters())
    step = TrainStep(model, opt, precision=precision, clip_grad=None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)  # the same drop-path masks in every precision
    loss, logits = step(x, y)
    assert all(p.grad is None for p in model.parameters())  # the step cleared them
    return loss, logits, torch.cat([t.flatten() for t in opt.grads[0]]), opt.grads[0]


@pytest.mark.parametrize("precision", ["bf16", "bf16-pure"])
@pytest.mark.parametrize("kw", [{}, {"drop_path": 0.1}])
def test_bf16_step_gradients_match_fp32(precision, kw):
    """One step's master gradients in bf16 are fp32's within bf16 rounding (a 10% error, e.g. a gradient
    scaled by 1.1, fails), and they arrive as fp32 tensors."""
    loss32, logits32, g32, _ = _step_grads("fp32", **kw)
    loss, logits, g, parts = _step_grads(precision, **kw)
    assert all(t.dtype == torch.float32 for t in parts)
    assert _rel(g, g32) < 0.02
    assert abs(loss.item() - loss32.item()) < 0.01 * loss32.item()
    assert _rel(logits, logits32) < 0.02


def test_bf16_pure_keeps_fp32_master_weights_and_learns():
    model = create_model("tutorial", seed=0, depth=2)
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), precision="bf16-pure")
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    losses = [step(x, y)[0].item() for _ in range(5)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0] - 0.1


def test_bf16_pure_sees_weight_changes_made_outside_the_step():
    model = create_model("tutorial", seed=0, depth=1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="bf16-pure")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)
    _, logits = step(x, y)
    torch.testing.assert_close(logits.float(), torch.ones(4, 10))


def _confident_model():
    """A model whose logits spread over several units (a fresh init's are ~0.1 apart, which hides errors)."""
    model = create_model("tutorial", seed=0).eval()
    with torch.no_grad():
        model.head.weight.mul_(100.0)
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
def test_inference_forward_matches_fp32(precision):
    model = _confident_model()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert ref.std() > 1.0  # meaningful logits
    out = inference_forward(copy.deepcopy(model), precision)(x)
    assert out.dtype == torch.float32
    if precision == "fp32":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert _rel(out, ref) < 0.02
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_autocast_only_for_bf16():
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_bf16_pure_inference_in_cache_slices_equals_per_image_results():
    model = create_model("S/4", image_size=16, num_classes=10, seed=0, depth=2)
    chunk = cache_chunk(model, torch.device("cpu"))
    assert chunk == CPU_SLICE_BYTES // (model.cfg.num_tokens * model.cfg.width * 2)
    assert cache_chunk(create_model("tutorial", image_size=16), torch.device("meta")) > 10**9  # not CPU
    fwd = inference_forward(model, "bf16-pure")
    x = torch.randn(chunk * 2 + 3, 3, 16, 16)  # two full slices and a remainder
    out = fwd(x)
    assert out.shape == (x.shape[0], 10) and out.dtype == torch.float32
    idx = list(range(0, x.shape[0], 37)) + [x.shape[0] - 1]
    each = torch.cat([fwd(x[i:i + 1]) for i in idx])
    # bf16: kernels may pick other blockings for other batch sizes, so equal within bf16 rounding
    assert _rel(out[idx], each) < 0.01
