"""Every figure is written as a non-empty PNG of exactly figsize x dpi pixels, with real content."""

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")  # every test here draws (the "plot" extra); vitlab's own module must import

from vitlab.inspect import plots  # noqa: E402


def rng_maps(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


IMAGES = (rng_maps(2, 3, 16, 16) * 255).to(torch.uint8)
LABELS = [plots.ImageLabel("pred: cat (90%)\ntrue: cat", True), plots.ImageLabel("pred: dog\ntrue: ?")]
SIM = rng_maps(16, 16) * 2 - 1

FIGURES = {
    "heads": lambda: plots.plot_attention_grid(IMAGES, rng_maps(2, 3, 4, 4), labels=LABELS,
                                               col_titles=["head 1", "head 2", "head 3"], title="heads"),
    "rollout": lambda: plots.plot_rollout(IMAGES, rng_maps(2, 4, 4), labels=LABELS, title="rollout"),
    "distance": lambda: plots.plot_attention_distance(rng_maps(4, 3) * 20, patch_size=4, image_size=32,
                                                      uniform=12.0),
    "posemb": lambda: plots.plot_position_similarity(SIM, grid=(4, 4), kind="learned"),
    "filters": lambda: plots.plot_patch_filters(rng_maps(10, 3, 4, 4), explained_variance_ratio=torch.full((10,), 0.1)),
    "embeddings": lambda: plots.plot_embeddings([("PCA", rng_maps(30, 2)), ("t-SNE", rng_maps(30, 2, seed=1))],
                                                classes=torch.arange(30) % 3, class_names=["a", "b", "c"],
                                                what="Class-token embeddings", colored_by="true class"),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_png_size_and_content(tmp_path, name):
    fig = FIGURES[name]()
    path = plots.save_figure(fig, tmp_path / f"{name}.png")
    assert path.stat().st_size > 5_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == plots.figure_pixels(fig)
        assert 400 <= im.size[0] <= 2600 and 300 <= im.size[1] <= 2600
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, not a blank canvas
    assert fig._suptitle is not None or any(ax.get_title() for ax in fig.axes)  # every figure has a title


def test_similarity_mosaic_places_each_row_in_its_tile():
    sim = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16)
    m = plots.similarity_mosaic(sim, (4, 4))
    assert m.shape == (19, 19)
    r, c = 2, 3  # position 2*4+3 = 11 sits at tile row 2, tile column 3
    np.testing.assert_array_equal(m[r * 5:r * 5 + 4, c * 5:c * 5 + 4], sim[11].reshape(4, 4).numpy())
    assert np.isnan(m[4]).all() and np.isnan(m[:, 4]).all()  # one-pixel gaps between tiles
