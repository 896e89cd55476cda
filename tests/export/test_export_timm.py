"""`--to timm`: timm itself loads the export strictly, in each of its ways, with the same outputs and preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.export import export_model
from vitlab.model import VisionTransformer


def timm_or_skip():
    return pytest.importorskip("timm", reason="timm is not installed (pip install 'vitlab[dev]')")


VARIANTS = {
    "default": {},
    "registers_map": dict(reg_tokens=2, pooling="map", class_token=False),
    "gap_fc_norm": dict(pooling="gap"),
    "sincos_layerscale": dict(pos_embed="sincos2d", layerscale_init=1e-5),
    "distilled": dict(distill_token=True),
    "quick_gelu_no_qkv_bias": dict(activation="quick_gelu", qkv_bias=False),
    "pre_norm_no_bias": dict(pre_norm=True, patch_bias=False),
    "features_only": dict(num_classes=0),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_timm_loads_the_export_strictly_three_ways(overrides, vit_dir, tmp_path):
    timm = timm_or_skip()
    run = vit_dir(**overrides)
    out = export_model(run, tmp_path / "timm", to="timm").out
    ours = VisionTransformer.from_pretrained(run)
    config = json.loads((out / "config.json").read_text())
    weights = str(out / "model.safetensors")
    n = ours.cfg.num_classes
    models = [
        timm.create_model(f"local-dir:{out}", pretrained=True),
        timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                          pretrained_cfg_overlay=dict(file=weights, num_classes=n)),
        timm.create_model(config["architecture"], checkpoint_path=weights, **config["model_args"]),
    ]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ours(x)
        for m in models:
            torch.testing.assert_close(m.eval()(x), want, atol=1e-5, rtol=0)
    assert models[0].pretrained_cfg.get("label_names") == VisionTransformer.read_class_names(run)


def test_timm_refuses_a_checkpoint_that_does_not_fit(vit_dir, tmp_path):
    """Strict loading is timm's, not a promise of ours: a missing tensor must fail, not initialise silently."""
    timm = timm_or_skip()
    from safetensors.torch import load_file, save_file

    out = export_model(vit_dir(), tmp_path / "timm", to="timm", check=False).out
    state = load_file(out / "model.safetensors")
    del state["blocks.1.mlp.fc2.bias"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(RuntimeError, match="blocks.1.mlp.fc2.bias"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_timm_preprocessing_gives_vitlab_pixels(vit_dir, tmp_path):
    timm = timm_or_skip()
    from vitlab.modeldir import open_model_dir

    run = vit_dir()
    out = export_model(run, tmp_path / "timm", to="timm", check=False).out
    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=m))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pre = open_model_dir(run).preprocess  # what `vitlab predict` does to a file
    torch.testing.assert_close(transform(photo)[None], pre([photo]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [{}, dict(reg_tokens=1, pooling="gap"), dict(pos_embed_prefix=False)],
                         ids=["default", "registers_gap", "patch_only_positions"])
def test_round_trip_vitlab_timm_vitlab_is_exact(overrides, vit_dir, tmp_path):
    timm_or_skip()
    run = vit_dir(**overrides)
    out = export_model(run, tmp_path / "timm", to="timm", check=False).out
    assert main(["convert", "--from", "timm", str(out), str(tmp_path / "back")]) == 0
    ours, back = VisionTransformer.from_pretrained(run), VisionTransformer.from_pretrained(tmp_path / "back")
    assert back.cfg == ours.cfg
    assert VisionTransformer.read_class_names(tmp_path / "back") == VisionTransformer.read_class_names(run)
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


FEATURES = {
    "layernorm_eps": (dict(norm_eps=1e-12), "norm_eps=1e-12"),
    "pre_logits": (dict(pre_logits_dim=16), "pre_logits_dim"),
    "conv_stem": (dict(stem="conv"), "stem"),
    "seq_pooling": (dict(pooling="seq"), "pooling"),
}


@pytest.mark.parametrize("overrides,words", FEATURES.values(), ids=FEATURES.keys())
def test_what_timm_cannot_express_is_named(overrides, words, vit_dir, tmp_path):
    with pytest.raises(VitlabError, match=words):
        export_model(vit_dir(**overrides), tmp_path / "timm", to="timm")
    assert not (tmp_path / "timm").exists()


def test_clip_dirs_do_not_export_to_timm(clip_dir, tmp_path):
    with pytest.raises(VitlabError, match="hf or onnx"):
        export_model(clip_dir("siglip"), tmp_path / "timm", to="timm")
