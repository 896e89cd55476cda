"""Attention maps and attention rollout (Abnar & Zuidema 2020) against hand-computed cases."""

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.inspect import attention_maps, attention_rollout, cls_attention, pooling_attention, rollout_map


def random_attention(B, H, N, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, N, generator=g).softmax(dim=-1)


def test_identity_attention_rolls_out_to_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)  # (B, H, N, N): every token attends only to itself
    R = attention_rollout([eye, eye, eye], num_prefix_tokens=1)
    assert R.shape == (2, 5, 5)
    torch.testing.assert_close(R, torch.eye(5).expand(2, 5, 5))


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    attns = [random_attention(2, 4, 7, seed=s) for s in range(3)]
    R = attention_rollout(attns, num_prefix_tokens=2, head_fusion=head_fusion, discard_ratio=discard_ratio)
    torch.testing.assert_close(R.sum(-1), torch.ones(2, 7))
    assert (R >= 0).all()


def test_rollout_two_layers_by_hand():
    # Layer 1: two heads, "swap" and "self": mean [[.5,.5],[.5,.5]]; + I and renormalised: [[.75,.25],[.25,.75]].
    # Layer 2: one head, everybody attends to token 1: [[0,1],[0,1]] -> [[.5,.5],[0,1]].
    # Rollout = A2 @ A1 = [[.5*.75+.5*.25, .5*.25+.5*.75], [.25, .75]].
    l1 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    l2 = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    R = attention_rollout([l1, l2], num_prefix_tokens=0)
    torch.testing.assert_close(R[0], torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


def test_rollout_matches_paper_formula():
    # The paper writes each layer as 0.5 * W_att + 0.5 * I (W rows sum to 1), then multiplies layers.
    attns = [random_attention(1, 3, 6, seed=s) for s in range(4)]
    expected = np.eye(6)
    for a in attns:
        expected = (0.5 * a[0].mean(0).double().numpy() + 0.5 * np.eye(6)) @ expected
    R = attention_rollout(attns, num_prefix_tokens=1)
    np.testing.assert_allclose(R[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_discard_keeps_prefix_columns():
    a = random_attention(1, 1, 6)
    R = attention_rollout([a], num_prefix_tokens=2, discard_ratio=0.75)  # drops 3 of 4 patch columns per row
    kept_patch = (R[0, :, 2:] > 0).sum(-1)
    assert (R[0, :, :2] > 0).all()
    assert (kept_patch <= 2).all()  # one patch kept by discard, plus the diagonal for patch rows


def test_rollout_map_per_pooling():
    R = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5)  # 1 prefix token, 4 patches
    torch.testing.assert_close(rollout_map(R, pooling="cls", num_prefix_tokens=1), R[:, 0, 1:])
    torch.testing.assert_close(rollout_map(R, pooling="gap", num_prefix_tokens=1),
                               R[:, 1:, 1:].mean(dim=1))
    onehot = torch.zeros(1, 2, 4)
    onehot[:, :, 2] = 1.0  # both MAP heads look only at final patch 2 = token 3
    torch.testing.assert_close(rollout_map(R, pooling="map", num_prefix_tokens=1, pool_attention=onehot),
                               R[:, 3, 1:])
    with pytest.raises(VitlabError):
        rollout_map(R, pooling="map", num_prefix_tokens=1)


def test_attention_maps_match_manual_softmax(tiny):
    model = tiny(reg_tokens=2)
    x = torch.randn(2, 3, 16, 16)
    attns = attention_maps(model, x)
    assert len(attns) == 2 and attns[0].shape == (2, 2, 19, 19)  # 1 cls + 2 registers + 16 patches
    torch.testing.assert_close(attns[1].sum(-1), torch.ones(2, 2, 19))
    # Block 0 by hand: softmax(q k^T / sqrt(d)) from the fused qkv projection of norm1(tokens).
    blk = model.blocks[0]
    with torch.no_grad():
        h = blk.norm1(model.embed(x))
        q, k, _ = blk.attn.qkv(h).reshape(2, 19, 3, 2, 8).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    torch.testing.assert_close(attns[0], expected, rtol=1e-4, atol=1e-5)


def test_cls_attention_drops_prefix_columns():
    a = random_attention(2, 3, 1 + 2 + 16)
    out = cls_attention(a, num_prefix_tokens=3)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, a[:, :, 0, 3:])
    mean_rows = cls_attention(a, num_prefix_tokens=3, query="patches")
    torch.testing.assert_close(mean_rows, a[:, :, 3:, 3:].mean(dim=2))
    with pytest.raises(VitlabError):
        cls_attention(a, num_prefix_tokens=0)


def test_pooling_attention_of_map_head(tiny):
    model = tiny(pooling="map", class_token=False, reg_tokens=1)
    feats = model.forward_features(torch.randn(2, 3, 16, 16))
    pa = pooling_attention(model, feats)
    assert pa.shape == (2, 2, 16)  # (B, heads, patches): the register token is not pooled
    torch.testing.assert_close(pa.sum(-1), torch.ones(2, 2))
    with pytest.raises(VitlabError):
        pooling_attention(tiny(), feats)


def test_seq_pooling_rollout_follows_the_pooling_weights():
    """Sequence pooling (CCT): `pooling_attention` gives the weights `pool` really uses, and rollout weights the
    patch rows by them; the TensorBoard probe draws it (it used to refuse 'seq')."""
    from vitlab.inspect.attention import attention_rollout, forward_with_attention, pooling_attention, rollout_map
    from vitlab.model import create_model
    from vitlab.train.tensorboard import RolloutProbe

    model = create_model("tutorial", seed=0, width=16, depth=2, heads=2, mlp_dim=32, image_size=16, patch_size=4,
                         num_classes=10, pooling="seq", class_token=False, reg_tokens=1).eval()
    x = torch.randn(3, 3, 16, 16)
    feats, attns = forward_with_attention(model, x)
    w = pooling_attention(model, feats)  # (B, 1, Np)
    p = model.num_prefix_tokens
    assert w.shape == (3, 1, 16) and torch.allclose(w.sum(-1), torch.ones(3, 1))
    assert torch.allclose((w.transpose(1, 2) * feats[:, p:]).sum(1), model.pool(feats), atol=1e-6)
    R = attention_rollout(attns, num_prefix_tokens=p)
    flow = rollout_map(R, pooling="seq", num_prefix_tokens=p, pool_attention=w)
    assert torch.allclose(flow, torch.einsum("bn,bnm->bm", w[:, 0], R[:, p:, p:]), atol=1e-6)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    heat, probs = RolloutProbe(images, torch.tensor([0, 1]), [str(i) for i in range(10)], mean=(0.5,) * 3,
                               std=(0.5,) * 3).maps(model)
    assert heat.shape == (2, 4, 4) and probs.shape == (2, 10)
