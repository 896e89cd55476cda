"""The airbench-style CNN teacher: whitening from the data, shapes, a fixed first layer, save/load."""

import torch

from vitlab.distill import TeacherConfig, TeacherNet, whitening_weights


def test_whitening_makes_patch_coordinates_uncorrelated_unit_variance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16, generator=g))  # correlated channels
    images = images + torch.roll(images, 1, dims=-1)  # and correlated neighbours
    w = whitening_weights(images, eps=0.0)
    out = torch.nn.functional.conv2d(images, w)  # (N, 12, 15, 15)
    z = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(12), atol=2e-2, rtol=0)


def test_forward_shapes_and_fixed_whitening():
    model = TeacherNet(TeacherConfig(widths=(16, 32, 32)))
    model.init_whitening(torch.randn(32, 3, 32, 32))
    w = model.whiten.weight
    torch.testing.assert_close(w[12:], -w[:12])  # each filter and its negative
    assert not w.requires_grad and model.whiten.bias.requires_grad
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert w.grad is None and model.head.weight.grad is not None


def test_round_trip(tmp_path):
    model = TeacherNet(TeacherConfig(widths=(8, 16, 16), num_classes=4))
    model.init_whitening(torch.randn(16, 3, 32, 32))
    model.train()(torch.randn(8, 3, 32, 32))  # moves BatchNorm statistics
    model.save_pretrained(tmp_path)
    back = TeacherNet.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))
    assert "CNN 8/16/16" in back.summary()
