"""`--to hf`: the exported directories against the real transformers classes, pipeline and image processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitlab.convert.hf_clip import load_hf_clip
from vitlab.convert.hf_vit import effective_fields, from_hf_vit_state_dict
from vitlab.errors import VitlabError
from vitlab.export import export_model
from vitlab.model import VisionTransformer
from vitlab.weights import read_json


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install 'vitlab[dev]')")


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def png(path, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_classifier_loads_in_transformers_and_its_pipeline(vit_dir, tmp_path, monkeypatch):
    transformers = transformers_or_skip()
    from vitlab.train.predict import predict

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything must come from OUT
    run = vit_dir()
    out = export_model(run, tmp_path / "hf", to="hf").out
    ours = VisionTransformer.from_pretrained(run)
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "ViTForImageClassification"
    assert hf.config.id2label == dict(enumerate(VisionTransformer.read_class_names(run)))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        close(hf(pixel_values=x).logits, ours(x))
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == pytest.approx(read_json(run / "preprocessor_config.json")["image_mean"])
    assert list(processor.image_std) == pytest.approx(read_json(run / "preprocessor_config.json")["image_std"])
    assert (processor.size["height"], processor.size["width"]) == (32, 32)

    image = png(tmp_path / "img.png")
    pipe = transformers.pipeline("image-classification", model=str(out))
    top = pipe(str(image), top_k=5)
    [pred] = predict(run, [image], top_k=5)
    assert [t["label"] for t in top] == pred.labels
    assert [t["score"] for t in top] == pytest.approx(pred.probs, abs=1e-5)


VARIANTS = {
    "sincos": dict(pos_embed="sincos2d"),
    "no_positions": dict(pos_embed="none"),
    "patch_only_positions": dict(pos_embed_prefix=False),
    "tanh_no_qkv_bias_eps": dict(activation="gelu_tanh", qkv_bias=False, norm_eps=1e-12, image_size=40, patch_size=5),
    "quick_gelu_gray": dict(activation="quick_gelu", in_channels=1),
    "features_only": dict(num_classes=0),
    "pooler": dict(num_classes=0, pre_logits_dim=24),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_variants_match_transformers(overrides, vit_dir, tmp_path):
    transformers = transformers_or_skip()
    run = vit_dir(**overrides)
    out = export_model(run, tmp_path / "hf", to="hf").out
    ours = VisionTransformer.from_pretrained(run)
    c = ours.cfg
    x = torch.randn(3, c.in_channels, c.image_size, c.image_size)
    with torch.no_grad():
        if c.pre_logits_dim:
            hf = transformers.ViTModel.from_pretrained(out).eval()
            close(hf(pixel_values=x).pooler_output, ours(x))
            close(hf(pixel_values=x).last_hidden_state, ours.forward_features(x))
        else:
            hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
            assert hf.config.num_labels == c.num_classes
            close(hf(pixel_values=x).logits, ours(x))


@pytest.mark.parametrize("overrides", [{}, dict(num_classes=0, pre_logits_dim=24), dict(qkv_bias=False)],
                         ids=["classifier", "pooler", "no_qkv_bias"])
def test_round_trip_vitlab_hf_vitlab_is_exact(overrides, vit_dir, tmp_path):
    run = vit_dir(**overrides)
    out = export_model(run, tmp_path / "hf", to="hf", check=False).out
    back = from_hf_vit_state_dict(load_file(out / "model.safetensors"), read_json(out / "config.json"))
    ours = VisionTransformer.from_pretrained(run)
    assert effective_fields(back.cfg) == effective_fields(ours.cfg)  # fc_norm=None and False mean the same
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


FEATURES = {
    "registers": (dict(reg_tokens=2), "register tokens"),
    "map_head": (dict(pooling="map", class_token=False), "MAP"),
    "gap": (dict(pooling="gap", class_token=False), "global average pooling"),
    "layerscale": (dict(layerscale_init=1e-5), "LayerScale"),
    "conv_stem": (dict(stem="conv"), "convolutional stem"),
    "distill_token": (dict(distill_token=True), "distillation token"),
    "pre_norm": (dict(pre_norm=True, patch_bias=True), "LayerNorm before the encoder"),
    "pre_logits_and_head": (dict(pre_logits_dim=16), "pre-logits"),
}


@pytest.mark.parametrize("overrides,words", FEATURES.values(), ids=FEATURES.keys())
def test_features_without_hf_equivalent_are_named_and_nothing_is_written(overrides, words, vit_dir, tmp_path):
    run = vit_dir(**overrides)
    with pytest.raises(VitlabError, match=words):
        export_model(run, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def _clip_inputs(kind: str):
    from vitlab.clip.tokenizer import ByteTokenizer

    ids = ByteTokenizer(context_length=16)(["a photo of a cat.", "a dog", "ship"])
    return torch.randn(2, 3, 32, 32), ids


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_match_transformers(kind, clip_dir, tmp_path):
    transformers = transformers_or_skip()
    from vitlab.modeldir import open_model_dir

    src = clip_dir(kind, logit_scale=5.0)  # above ln(100): vitlab's CLIP clamps the scale, transformers does not
    result = export_model(src, tmp_path / "hf", to="hf")
    assert any("tokenizer" in n for n in result.notes)
    hf = transformers.AutoModel.from_pretrained(result.out).eval()
    assert type(hf).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
    md = open_model_dir(src)
    ours, pre = md.model, md.preprocess
    x, ids = _clip_inputs(kind)
    with torch.no_grad():
        res = hf(pixel_values=x, input_ids=ids)
        img, txt = ours.encode_image(x), ours.encode_text(ids)
        close(res.image_embeds, img)
        close(res.text_embeds, txt)
        close(res.logits_per_image, ours.logits(img, txt), rtol=1e-5)  # scale ~100: float rounding grows too
    # the exported processor prepares images as vitlab's preprocessing (both torch-resampled here)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(result.out)
    close(processor(images=photo, return_tensors="pt")["pixel_values"], pre([photo]), atol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_round_trip_is_exact(kind, clip_dir, tmp_path):
    from vitlab.clip.model import CLIPModel

    src = clip_dir(kind)
    out = export_model(src, tmp_path / "hf", to="hf", check=False).out
    back, ours = load_hf_clip(out), CLIPModel.from_pretrained(src)
    assert effective_fields(back.cfg.vision) == effective_fields(ours.cfg.vision) and back.cfg.text == ours.cfg.text
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_clip_feature_without_hf_equivalent(clip_dir, tmp_path):
    from vitlab.clip.model import CLIPModel

    src = clip_dir("clip")
    model = CLIPModel.from_pretrained(src)
    model.cfg.text.causal = False  # CLIP's text tower in transformers is always causal
    odd = tmp_path / "odd"
    model.save_pretrained(odd, tokenizer=None, preprocess=None)
    (odd / "config.json").write_text((odd / "config.json").read_text().replace(
        '"model_type": "vitlab_clip"', '"model_type": "vitlab_clip", "tokenizer": {"type": "bytes", '
        '"context_length": 16}'))
    with pytest.raises(VitlabError, match="causal=False"):
        export_model(odd, tmp_path / "hf", to="hf")
