"""PCA (filters, embeddings) against numpy's SVD, and the embeddings the classifier head sees."""

import numpy as np
import pytest
import torch

from vitlab.inspect import embed_images, has_tsne, patch_filter_components, patch_filter_pca, pca, pca_2d, tsne_2d


def numpy_pca(x):
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt, s**2 / (len(x) - 1), xc


def assert_same_up_to_sign(a, b, atol=1e-4):
    for row_a, row_b in zip(np.asarray(a), np.asarray(b)):
        sign = np.sign(row_a @ row_b)
        np.testing.assert_allclose(row_a, sign * row_b, atol=atol)


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) @ np.linalg.qr(
        rng.normal(size=(6, 6)))[0]
    p = pca(torch.tensor(x), k=4)
    vt, var, _ = numpy_pca(x)
    assert p.components.shape == (4, 6)
    assert_same_up_to_sign(p.components, vt[:4])
    np.testing.assert_allclose(p.explained_variance, var[:4], rtol=1e-4)
    np.testing.assert_allclose(p.explained_variance_ratio, var[:4] / var.sum(), rtol=1e-4)
    assert np.all(np.diff(p.explained_variance.numpy()) <= 0)  # decreasing
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(4), atol=1e-5)  # orthonormal


def test_pca_2d_projects_on_first_two_components():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)) * np.array([4.0, 2.0, 1.0, 0.5, 0.2])
    xy = pca_2d(torch.tensor(x, dtype=torch.float32))
    vt, _, xc = numpy_pca(x)
    assert_same_up_to_sign(xy.T.numpy(), (xc @ vt[:2].T).T, atol=1e-3)


def test_patch_filter_components_are_pca_of_conv_weight(tiny):
    model = tiny()
    comps = patch_filter_components(model, 10)
    assert comps.shape == (10, 3, 4, 4)  # (k, C, P, P)
    w = model.patch_embed.proj.weight.detach().flatten(1).numpy()  # (D=16, 48)
    vt, _, _ = numpy_pca(w)
    flat = comps.flatten(1).numpy()
    assert_same_up_to_sign(flat, vt[:10])
    np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-5)
    # k is capped by the number of filters
    assert patch_filter_pca(model, k=100).components.shape[0] == 16


def test_embed_images_is_what_the_head_classifies(tiny):
    x = torch.randn(3, 3, 16, 16)
    cls_model = tiny()
    with torch.no_grad():
        tokens = cls_model.forward_features(x)
        torch.testing.assert_close(embed_images(cls_model, x), tokens[:, 0])  # final-normed class token
        torch.testing.assert_close(cls_model.head(embed_images(cls_model, x)), cls_model(x))
    gap_model = tiny(pooling="gap", class_token=False, reg_tokens=1)
    with torch.no_grad():
        tokens = gap_model.forward_features(x)
        expected = gap_model.fc_norm(tokens[:, 1:].mean(dim=1))  # register token left out of the mean
    torch.testing.assert_close(embed_images(gap_model, x, batch_size=2), expected)


def test_tsne_separates_two_clusters():
    pytest.importorskip("sklearn")
    assert has_tsne()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(12, 1, (20, 8))])
    xy = tsne_2d(torch.tensor(x, dtype=torch.float32)).numpy()
    assert xy.shape == (40, 2)
    a, b = xy[:20].mean(0), xy[20:].mean(0)
    spread = max(xy[:20].std(0).max(), xy[20:].std(0).max())
    assert np.linalg.norm(a - b) > 3 * spread  # the two clusters stay apart in 2-D
