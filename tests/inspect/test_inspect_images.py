"""The run's preprocessing: preprocessor_config.json (or the mean/std 0.5 default) at the model's size."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.inspect import model_inputs, prepare_images, run_preprocess


def test_default_is_half_mean_std_at_model_size(tmp_path):
    pre = run_preprocess(tmp_path, image_size=16)
    assert pre.output_size == 16 and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).convert("L").save(tmp_path / "gray.png")
    images = prepare_images(pre, [tmp_path / "a.png", tmp_path / "gray.png"])
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8  # any mode -> RGB, model size
    # Square bicubic resize, as Pillow does it (within one 8-bit level: torch and PIL round differently).
    pil = np.asarray(Image.fromarray(arr).resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(images[0].numpy().astype(int) - pil.astype(int)).mean() < 1.0
    x = model_inputs(pre, images)
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.5)


def test_run_config_mean_std_and_model_size_win(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "rescale_factor": 1 / 255,
         "size": {"height": 32, "width": 32}, "resample": 3}))
    pre = run_preprocess(tmp_path, image_size=16)  # the config says 32, the model 16
    assert pre.output_size == 16
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 16, 16).contiguous()
    assert torch.equal(prepare_images(pre, images), images)  # already at the model size: untouched
    expected = torch.tensor([(0 - 0.4) / 0.2, (128 / 255 - 0.5) / 0.25, (1.0 - 0.6) / 0.3])
    torch.testing.assert_close(model_inputs(pre, images)[0, :, 0, 0], expected)
    big = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert prepare_images(pre, big).shape == (2, 3, 16, 16)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(VitlabError, match="cannot read image"):
        prepare_images(run_preprocess(tmp_path, image_size=16), [bad])
