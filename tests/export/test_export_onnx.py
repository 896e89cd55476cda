"""`--to onnx`: onnxruntime runs the exported graphs at any batch size with vitlab's outputs (within 1e-4)."""

from __future__ import annotations

import pytest
import torch

from vitlab.export import export_model
from vitlab.model import VisionTransformer


def onnx_or_skip():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install 'vitlab[export]')")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'vitlab[export]')")


@pytest.mark.parametrize("overrides", [{}, dict(reg_tokens=2, pooling="map", class_token=False, layerscale_init=0.1)],
                         ids=["cls", "registers_map_layerscale"])
def test_onnxruntime_matches_with_a_dynamic_batch(overrides, vit_dir, tmp_path):
    ort = onnx_or_skip()
    run = vit_dir(**overrides)
    out = export_model(run, tmp_path / "onnx", to="onnx", check=False).out
    assert {p.name for p in out.iterdir()} == {"model.onnx", "config.json", "preprocessor_config.json",
                                                 "vitlab_export.json"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert inp.name == "pixel_values" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    ours = VisionTransformer.from_pretrained(run)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        [logits] = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), ours(x), atol=1e-4, rtol=0)


def test_clip_exports_both_encoders(clip_dir, tmp_path):
    ort = onnx_or_skip()
    from vitlab.modeldir import open_model_dir

    src = clip_dir("clip")
    result = export_model(src, tmp_path / "onnx", to="onnx")
    assert result.max_diff is not None and result.max_diff < 1e-4
    md = open_model_dir(src)
    model, tokenizer = md.model, md.tokenizer
    image = ort.InferenceSession(str(result.out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(result.out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    x, ids = torch.randn(4, 3, 32, 32), tokenizer(["a cat", "a photo of a dog", "x"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(image.run(None, {"pixel_values": x.numpy()})[0]),
                                   model.encode_image(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(text.run(None, {"input_ids": ids.numpy()})[0]),
                                   model.encode_text(ids), atol=1e-4, rtol=0)
