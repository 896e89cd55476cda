"""Test-time augmentation: the prediction is the mean of the views' logits, and the views are what they say."""

import pytest
import torch

from vitlab.model import create_model
from vitlab.train.tta import shift, tta_forward, views


def test_views():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float).view(2, 1, 4, 5)
    v = views(x, "flip-translate")
    assert len(v) == 6 and torch.equal(v[0], x) and torch.equal(v[1], x.flip(-1))
    s = shift(x, 1, 1)  # content moves down-right: pixel (i, j) of the result is (i-1, j-1) of the input
    assert torch.equal(s[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(s[..., 0, 1:], x[..., 1, :-1])  # the uncovered row is the reflection
    assert torch.equal(v[4], shift(x, 1, 1)) and torch.equal(v[5], shift(x, 1, 1).flip(-1))
    assert len(views(x, "flip")) == 2 and len(views(x, "none")) == 1
    with pytest.raises(ValueError):
        views(x, "crop")


@pytest.mark.parametrize("mode", ["flip", "flip-translate"])
def test_prediction_is_the_mean_of_the_views(mode):
    model = create_model("tutorial", seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = tta_forward(model, mode)(x)
        want = sum(model(v) for v in views(x, mode)) / len(views(x, mode))
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, model(x))
        assert tta_forward(model, "none") is model
