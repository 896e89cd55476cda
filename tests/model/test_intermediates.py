"""forward_features / forward_attention / forward_intermediates: timm's API, timm's numbers."""

import importlib.util

import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.model import create_model

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


def _pair(**kw):
    from vitlab.bench import timm_twin

    ours = create_model("tutorial", seed=0, **kw).eval()
    return ours, timm_twin(ours).eval()


@needs_timm
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"pooling": "gap", "class_token": False}])
@pytest.mark.parametrize("call", [
    dict(),
    dict(indices=2),
    dict(indices=[0, 2], norm=True),
    dict(indices=[1], output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[1], stop_early=True),
    dict(indices=3, intermediates_only=True),
])
def test_forward_intermediates_equals_timm(kw, call):
    ours, theirs = _pair(**kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours.forward_intermediates(x, **call), theirs.forward_intermediates(x, **call)
    if not call.get("intermediates_only"):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        a, b = a[1], b[1]
    assert len(a) == len(b) > 0 and type(a[0]) is type(b[0])
    for u, v in zip(a, b):
        for s, t in (zip(u, v) if isinstance(u, tuple) else [(u, v)]):
            assert s.shape == t.shape
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-5)


def test_intermediates_shapes_and_errors():
    model = create_model("tutorial", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape for t in inter] == [(2, 48, 8, 8)] * 4
        last = model.forward_intermediates(x, indices=[-1], intermediates_only=True, output_fmt="NLC")
    assert last[0].shape == (2, 64, 48)
    with pytest.raises(VitlabError):
        model.forward_intermediates(x, indices=[7])
    with pytest.raises(VitlabError):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_forward_attention_is_forward_features_plus_probabilities():
    model = create_model("tutorial", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, attns = model.forward_attention(x)
        logits, attns2 = model(x, return_attention=True)
        torch.testing.assert_close(feats, model.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    assert len(attns) == 4 and attns[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 65))
    assert all(torch.equal(a, b) for a, b in zip(attns, attns2))
