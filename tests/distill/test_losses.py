"""DeiT's distillation losses against the paper's formulas written out by hand."""

import math

import pytest
import torch

from vitlab.distill import distillation_loss


def _ce(logits, labels):
    return -torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels].mean()


def test_hard_distillation_is_half_label_half_teacher_argmax():
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(6, 5, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    want = 0.5 * _ce(cls, y) + 0.5 * _ce(dist, teacher.argmax(-1))
    torch.testing.assert_close(distillation_loss((cls, dist), y, teacher, mode="hard"), want)
    # one head (no distillation token): the same formula with that head in both places
    torch.testing.assert_close(distillation_loss(cls, y, teacher, mode="hard"),
                               0.5 * _ce(cls, y) + 0.5 * _ce(cls, teacher.argmax(-1)))


@pytest.mark.parametrize("tau, alpha", [(1.0, 0.5), (3.0, 0.1)])
def test_soft_distillation_is_the_tempered_kl(tau, alpha):
    g = torch.Generator().manual_seed(1)
    cls, dist, teacher = (torch.randn(4, 3, generator=g) * 2 for _ in range(3))
    y = torch.softmax(torch.randn(4, 3, generator=g), -1)  # soft targets (label smoothing, mixup)
    p_t = torch.softmax(teacher / tau, -1)
    kl = sum((p_t[i] * (p_t[i].log() - torch.log_softmax(dist[i] / tau, -1))).sum() for i in range(4)) / 4
    ce = -(y * torch.log_softmax(cls, -1)).sum(-1).mean()
    want = (1 - alpha) * ce + alpha * tau**2 * kl
    torch.testing.assert_close(distillation_loss((cls, dist), y, teacher, mode="soft", alpha=alpha, tau=tau), want)


def test_a_student_equal_to_its_teacher_has_no_soft_distillation_term():
    t = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    got = distillation_loss((t, t), y, t, mode="soft", alpha=1.0, tau=2.0)
    assert math.isclose(got.item(), 0.0, abs_tol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        distillation_loss(t, y, t, mode="feature")
