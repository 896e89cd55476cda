"""CLIP and SigLIP losses against loop/numpy formulas written here, hand-computed cases and transformers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlab.clip.losses as losses
from vitlab.clip.losses import clip_loss, siglip_loss, siglip_loss_chunked
from vitlab.errors import VitlabError


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _embeds(b, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def clip_reference(img: np.ndarray, txt: np.ndarray, t: float) -> float:
    """Softmax cross-entropy, images->texts and texts->images, element by element."""
    s = min(math.exp(t), 100.0)
    B = len(img)
    cos = [[float(np.dot(img[i], txt[j])) for j in range(B)] for i in range(B)]
    i2t = sum(-s * cos[i][i] + math.log(sum(math.exp(s * cos[i][j]) for j in range(B))) for i in range(B)) / B
    t2i = sum(-s * cos[j][j] + math.log(sum(math.exp(s * cos[i][j]) for i in range(B))) for j in range(B)) / B
    return (i2t + t2i) / 2


def siglip_reference(img: np.ndarray, txt: np.ndarray, t: float, b: float) -> float:
    """sum over all pairs of log(1 + exp(-y z)), y = +1 on the diagonal and -1 elsewhere, divided by B."""
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = math.exp(t) * float(np.dot(img[i], txt[j])) + b
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))
    return total / len(img)


def siglip_reference_torch(img, txt, t, b):
    """The same sum with torch ops pair by pair, so autograd gives reference gradients."""
    total = 0.0
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            z = t.exp() * (img[i] * txt[j]).sum() + b
            total = total + F.softplus(-(1.0 if i == j else -1.0) * z)
    return total / img.shape[0]


def test_clip_loss_matches_loops():
    img, txt = _embeds(6)
    for t in (0.0, math.log(1 / 0.07), 3.0):
        assert clip_loss(img, txt, _t(t)).item() == pytest.approx(
            clip_reference(img.numpy(), txt.numpy(), t), rel=1e-12)


def test_clip_loss_hand_case_and_clamp():
    """B=2, orthogonal pairs matched: cos = I, so each row gives log(1 + e^-s); s clamps at 100."""
    eye = torch.eye(2, dtype=torch.float64)
    assert clip_loss(eye, eye, _t(0.0)).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    # cos(60 deg) = 0.5 off the diagonal: row loss = log(1 + e^{s(0.5 - 1)})
    txt = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    img = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    s = 2.0
    expect = math.log1p(math.exp(-s * 0.5))
    assert clip_loss(img, txt, _t(math.log(s))).item() == pytest.approx(expect)
    a, b = _embeds(4)
    assert clip_loss(a, b, _t(math.log(1000.0))).item() == pytest.approx(
        clip_loss(a, b, _t(math.log(100.0))).item())


def test_clip_loss_matches_transformers():
    modeling_clip = pytest.importorskip("transformers.models.clip.modeling_clip")
    img, txt = _embeds(5)
    t = torch.tensor(2.0, dtype=torch.float64)
    logits_per_text = t.exp() * txt @ img.T
    assert clip_loss(img, txt, t).item() == pytest.approx(
        modeling_clip.image_text_contrastive_loss(logits_per_text).item(), rel=1e-12)


def test_siglip_loss_matches_loops_and_hand_case():
    img, txt = _embeds(5)
    for t, b in ((math.log(10.0), -10.0), (1.0, 0.5), (0.0, 0.0)):
        assert siglip_loss(img, txt, _t(t), _t(b)).item() == pytest.approx(
            siglip_reference(img.numpy(), txt.numpy(), t, b), rel=1e-12)
    # B=2, cos = I, scale 10, bias -10: positives have logit 0 (log 2 each), negatives -10 (log(1 + e^-10))
    eye = torch.eye(2, dtype=torch.float64)
    expect = (2 * math.log(2) + 2 * math.log1p(math.exp(-10))) / 2
    assert siglip_loss(eye, eye, _t(math.log(10.0)), _t(-10.0)).item() == pytest.approx(expect)


def _leaves(b, seed=1):
    img, txt = _embeds(b, seed=seed)
    t = torch.tensor(math.log(10.0), dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    return [x.clone().requires_grad_(True) for x in (img, txt, t, bias)]


def test_siglip_gradients_match_loop_reference():
    ours, ref = _leaves(5), _leaves(5)
    siglip_loss(*ours).backward()
    siglip_reference_torch(*ref).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_siglip_chunked_equals_dense(chunk, monkeypatch):
    """Values and every gradient agree; no block ever holds more than `chunk` texts."""
    dense, chunked = _leaves(7), _leaves(7)
    loss_d = siglip_loss(*dense)
    widths = []
    block = losses.siglip_pair_loss_sum

    def spy(image_embeds, text_embeds, *args, **kwargs):
        widths.append(text_embeds.shape[0])
        return block(image_embeds, text_embeds, *args, **kwargs)

    monkeypatch.setattr(losses, "siglip_pair_loss_sum", spy)
    loss_c = siglip_loss_chunked(*chunked, chunk_size=chunk)
    assert loss_c.item() == pytest.approx(loss_d.item(), rel=1e-12)
    loss_d.backward()
    loss_c.backward()
    for a, b in zip(dense, chunked):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert max(widths) <= min(chunk, 7)


def test_bad_shapes_are_rejected():
    a, b = _embeds(4)
    with pytest.raises(VitlabError, match="same shape"):
        clip_loss(a, b[:3], 0.0)
    with pytest.raises(VitlabError, match="chunk_size"):
        siglip_loss_chunked(a, b, 0.0, 0.0, chunk_size=0)
