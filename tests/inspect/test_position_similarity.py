"""Position-embedding similarity (ViT paper Fig. 7 centre) for sin-cos and learned tables."""

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.inspect import patch_position_embedding, position_similarity


def numpy_cosine(x):
    x = np.asarray(x, dtype=np.float64)
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    return n @ n.T


def test_sincos_similarity_is_symmetric_with_unit_diagonal(tiny):
    model = tiny(pos_embed="sincos2d")
    sim = position_similarity(model)
    assert sim.shape == (16, 16)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(16))
    assert sim.abs().max() <= 1 + 1e-6
    # A fixed 2-D embedding is most similar to its neighbours: patch 0 vs 1 (adjacent) > 0 vs 15 (far corner).
    assert sim[0, 1] > sim[0, 15]
    np.testing.assert_allclose(sim.numpy(), numpy_cosine(model.pos_embed[0]), atol=1e-5)


@pytest.mark.parametrize("prefix", [True, False])
def test_learned_table_strips_prefix_positions(tiny, prefix):
    model = tiny(reg_tokens=2, pos_embed_prefix=prefix)
    pe = patch_position_embedding(model)
    table = model.pos_embed.detach()[0]
    assert table.shape[0] == (19 if prefix else 16)
    assert pe.shape == (16, 16)
    torch.testing.assert_close(pe, table[3:] if prefix else table)
    np.testing.assert_allclose(position_similarity(model).numpy(), numpy_cosine(pe), atol=1e-5)


def test_no_position_embedding(tiny):
    model = tiny(pos_embed="none")
    assert patch_position_embedding(model) is None
    with pytest.raises(VitlabError, match="no position embedding"):
        position_similarity(model)
