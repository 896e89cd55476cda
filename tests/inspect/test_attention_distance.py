"""Mean attention distance (ViT paper Fig. 7 right) against hand-computed cases."""

import math

import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.inspect import mean_attention_distance, patch_distances


def test_patch_distances_by_hand():
    d = patch_distances((2, 3), 16)  # patches numbered row-major: 0 1 2 / 3 4 5
    assert d.shape == (6, 6)
    assert d[0, 0] == 0
    assert d[0, 2] == pytest.approx(32.0)  # two columns apart
    assert d[0, 3] == pytest.approx(16.0)  # one row apart
    assert d[0, 5] == pytest.approx(16 * math.sqrt(5))  # one row, two columns
    torch.testing.assert_close(d, d.T)


def test_identity_attention_has_zero_distance():
    eye = torch.eye(1 + 16).expand(3, 2, 17, 17)
    out = mean_attention_distance([eye, eye], grid=4, patch_size=8, num_prefix_tokens=1)
    assert out.shape == (2, 2)
    assert torch.all(out == 0)


def test_uniform_attention_on_2x2_grid():
    # Each query sees itself (0), two neighbours (1) and the diagonal (sqrt 2): mean (2 + sqrt 2) / 4 patches.
    uniform = torch.full((1, 1, 4, 4), 0.25)
    out = mean_attention_distance([uniform], grid=2, patch_size=16, num_prefix_tokens=0)
    assert out.item() == pytest.approx(16 * (2 + math.sqrt(2)) / 4)


def test_prefix_attention_counts_as_zero_distance():
    # 1 class token + 2x2 patches: each patch query puts half on the class token, half on the opposite
    # corner (sqrt 2 patches away); the class-token query row is not a patch query and is ignored.
    a = torch.zeros(1, 1, 5, 5)
    a[0, 0, 0, :] = 0.2
    for q, opposite in zip(range(4), (3, 2, 1, 0)):
        a[0, 0, 1 + q, 0] = 0.5
        a[0, 0, 1 + q, 1 + opposite] = 0.5
    out = mean_attention_distance([a], grid=(2, 2), patch_size=10, num_prefix_tokens=1)
    assert out.item() == pytest.approx(0.5 * 10 * math.sqrt(2))


def test_average_over_images_layers_and_heads():
    eye = torch.eye(4)
    uniform = torch.full((4, 4), 0.25)
    layer0 = torch.stack([torch.stack([eye, uniform]), torch.stack([eye, eye])])  # (B=2, H=2, 4, 4)
    layer1 = torch.stack([torch.stack([eye, eye])] * 2)
    out = mean_attention_distance([layer0, layer1], grid=2, patch_size=16, num_prefix_tokens=0)
    expected = torch.zeros(2, 2)
    expected[0, 1] = 16 * (2 + math.sqrt(2)) / 4 / 2  # head 1 of layer 0 is uniform in one image of two
    torch.testing.assert_close(out, expected)


def test_grid_mismatch_is_an_error():
    with pytest.raises(VitlabError, match="patches"):
        mean_attention_distance([torch.eye(5).expand(1, 1, 5, 5)], grid=3, patch_size=4, num_prefix_tokens=1)
