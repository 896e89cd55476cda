"""`predict` preprocessing equals Hugging Face's ViTImageProcessor (PIL backend) reading our config."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.model import create_model
from vitlab.modeldir import run_preprocess
from vitlab.rundir import read_preprocessor_config, write_preprocessor_config
from vitlab.train.predict import load_image, predict

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture()
def run_dir(tmp_path):
    model = create_model("test", seed=0)
    model.save_pretrained(tmp_path, class_names=CLASSES)
    write_preprocessor_config(tmp_path, image_size=32, mean=MEAN, std=STD)
    return tmp_path


def odd_images(folder):
    """Files in the modes people actually have, none of them 32x32 RGB."""
    rng = np.random.default_rng(0)
    paths = {}
    paths["rgba.png"] = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    paths["gray.jpg"] = Image.fromarray(rng.integers(0, 256, (45, 37), dtype=np.uint8), "L")
    paths["cmyk.jpg"] = Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "CMYK")
    pal = Image.fromarray(rng.integers(0, 256, (33, 64, 3), dtype=np.uint8)).convert("P")
    pal.info["transparency"] = 0
    paths["palette.png"] = pal
    paths["big.png"] = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    for name, im in paths.items():
        im.save(folder / name)
    return [folder / n for n in paths]


def test_preprocess_matches_hf_vit_image_processor(run_dir, tmp_path):
    vit_pil = pytest.importorskip("transformers.models.vit.image_processing_pil_vit")
    hf = vit_pil.ViTImageProcessorPil.from_pretrained(run_dir)
    pre = run_preprocess(run_dir)  # what predict applies
    for path in odd_images(tmp_path):
        ours = pre([load_image(path)])  # (1, 3, 32, 32)
        with Image.open(path) as im:
            ref = hf(images=im, return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=str(path))


def test_predict_top_k(run_dir, tmp_path):
    paths = odd_images(tmp_path)
    preds = predict(run_dir, paths, top_k=3)
    assert [p.path for p in preds] == [str(p) for p in paths]
    model = create_model("test", seed=0).eval()
    x = run_preprocess(run_dir)([load_image(p) for p in paths])
    with torch.no_grad():
        probs = model(x).softmax(-1)  # (5, 10)
    for i, p in enumerate(preds):
        assert len(p.labels) == 3 and all(lbl in CLASSES for lbl in p.labels)
        assert p.probs == sorted(p.probs, reverse=True)
        assert p.labels[0] == CLASSES[int(probs[i].argmax())]
        assert p.probs[0] == pytest.approx(float(probs[i].max()), abs=1e-6)


def test_bad_inputs(run_dir, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        predict(run_dir, [tmp_path / "junk.png"])
    with pytest.raises(ValueError, match="not found"):
        predict(run_dir, [tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="not found"):
        predict(tmp_path / "no-run", [tmp_path / "junk.png"])
    (run_dir / "preprocessor_config.json").write_text('{"size": {"height": 32}}')
    with pytest.raises(ValueError, match="lacks image_mean"):
        read_preprocessor_config(run_dir)
