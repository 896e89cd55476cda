"""Sequence pooling (CCT): an attention-weighted mean of the patch tokens."""

import torch

from vitlab.model import create_model


def test_seq_pooling_is_a_softmax_weighted_mean_of_the_patch_tokens():
    model = create_model("tutorial", pooling="seq", class_token=False, reg_tokens=1, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)  # (B, 1 + 64, D): the register is not pooled
        patches = feats[:, 1:]
        w = torch.softmax(patches @ model.seq_pool.weight[0] + model.seq_pool.bias, dim=1)  # (B, 64)
        by_hand = torch.einsum("bn,bnd->bd", w, patches)
        torch.testing.assert_close(model.pool(feats), by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), model.head(model.fc_norm(by_hand)), rtol=1e-5, atol=1e-5)
