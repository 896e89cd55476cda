"""Swin model dirs exported `--to hf` (transformers' Swin classes, image processor, pipeline) and `--to onnx`
(onnxruntime at other batch sizes), each against the vitlab model."""

from __future__ import annotations

import pytest
import torch

from vitlab.cli import main
from vitlab.export import export_model
from vitlab.model.swin import SwinConfig, SwinTransformer
from vitlab.rundir import write_preprocessor_config
from vitlab.weights import read_json

# 32 px, patch 2, window 4: grids 16, 8 (shifted blocks with masks) and 4 (one window)
CIFAR = dict(image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4))
NAMES = ["apple", "bee", "cat", "dog", "eel"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@torch.no_grad()
def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter off its init (bias tables by N(0, 1)), so a swapped or skipped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("relative_position_bias_table") else 0.1))
    return model.eval()


@pytest.fixture
def swin_dir(tmp_path):
    """swin_dir(name="swin", **config) -> a run-like Swin dir: weights, id2label, preprocessor_config.json."""

    def make(name: str = "swin", **overrides):
        cfg = SwinConfig(**{**CIFAR, "num_classes": 5, **overrides})
        d = tmp_path / name
        randomised(SwinTransformer(cfg)).save_pretrained(d, class_names=NAMES[:cfg.num_classes] or None)
        write_preprocessor_config(d, image_size=cfg.image_size, mean=CIFAR_MEAN, std=CIFAR_STD)
        return d

    return make


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_classifier_exports_to_transformers_and_its_pipeline(swin_dir, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything must come from OUT
    run = swin_dir()
    result = export_model(run, tmp_path / "hf", to="hf")
    assert result.max_diff is not None and result.max_diff <= 1e-5
    ours = SwinTransformer.from_pretrained(run)
    hf = transformers.AutoModelForImageClassification.from_pretrained(result.out).eval()
    assert type(hf).__name__ == "SwinForImageClassification"
    assert hf.config.id2label == dict(enumerate(NAMES))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        close(hf(pixel_values=x).logits, ours(x))
    processor = transformers.AutoImageProcessor.from_pretrained(result.out)
    assert list(processor.image_mean) == pytest.approx(CIFAR_MEAN) and list(processor.image_std) == pytest.approx(
        CIFAR_STD)
    image = Image.effect_noise((40, 40), 64).convert("RGB")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]  # the processor vitlab wrote
    with torch.no_grad():
        probs = ours(pixels).softmax(-1)[0]
    top = transformers.pipeline("image-classification", model=str(result.out))(image, top_k=3)
    want = probs.topk(3)
    assert [t["label"] for t in top] == [NAMES[i] for i in want.indices]
    assert [t["score"] for t in top] == pytest.approx(want.values.tolist(), abs=1e-5)


def test_feature_extractor_exports_as_swin_model(swin_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = swin_dir("features", num_classes=0)
    out = export_model(run, tmp_path / "hf", to="hf").out
    hf = transformers.AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == "SwinModel"
    ours = SwinTransformer.from_pretrained(run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=x)
        close(out.pooler_output, ours(x))
        close(out.last_hidden_state, ours.forward_features(x).flatten(1, 2))


def test_config_transformers_computes_differently_is_one_line_exit_2(swin_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    run = swin_dir("window5", window_size=5, depths=(2, 2), num_heads=(1, 2))  # 16 is no multiple of 5
    assert main(["export", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlab export: error:") and "not a multiple of the 5x5 window" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("overrides", [{}, dict(num_classes=0)], ids=["classifier", "features"])
def test_onnxruntime_matches_with_a_dynamic_batch(overrides, swin_dir, tmp_path):
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    ort = pytest.importorskip("onnxruntime")
    run = swin_dir(**overrides)
    result = export_model(run, tmp_path / "onnx", to="onnx")
    assert result.max_diff is not None and result.max_diff <= 1e-5
    assert read_json(result.out / "preprocessor_config.json")["image_mean"] == pytest.approx(CIFAR_MEAN)
    session = ort.InferenceSession(str(result.out / "model.onnx"), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert inp.name == "pixel_values" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    ours = SwinTransformer.from_pretrained(run)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        [y] = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            close(torch.from_numpy(y), ours(x))
