"""Test-time augmentation: the prediction is the mean of the views' logits, and the views are what they say."""

import pytest
import torch
import torch.nn.functional as F

from vitlab.data import normalize
from vitlab.model import create_model
from vitlab.train.evaluate import evaluate
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


def test_one_pass_scores_the_plain_and_the_tta_prediction():
    """evaluate(tta=...) takes the plain numbers from the first view of the same pass: they equal a plain
    evaluation's, and the TTA numbers equal those of the mean of the views scored directly."""
    model = create_model("tutorial", seed=0).eval()
    images, labels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, batch_size=16)
    plain, tta = evaluate(model, images, labels, **kw), evaluate(model, images, labels, tta="flip", **kw)
    assert plain.plain is None and tta.plain is not None
    assert (tta.plain.loss, tta.plain.top1, tta.plain.top5) == (plain.loss, plain.top1, plain.top5)
    assert torch.equal(tta.plain.confusion, plain.confusion)
    with torch.no_grad():
        logits = tta_forward(model, "flip")(normalize(images, kw["mean"], kw["std"]))
    torch.testing.assert_close(torch.tensor(tta.loss), F.cross_entropy(logits, labels).double().float(),
                               rtol=1e-5, atol=1e-6)
    assert tta.top1 == (logits.argmax(1) == labels).sum().item() / len(labels)
    assert set(tta.metrics("test_")) == {"test_loss", "test_top1", "test_top5", "test_loss_tta", "test_top1_tta",
                                         "test_top5_tta"}
    assert tta.metrics("test_")["test_top1"] == plain.top1 and tta.metrics("test_")["test_top1_tta"] == tta.top1
