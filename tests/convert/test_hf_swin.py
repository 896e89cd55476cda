"""Hugging Face Swin interop: converted models against the real transformers Swin classes, in memory and on disk."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from vitlab.cli import main  # noqa: E402
from vitlab.convert import from_hf  # noqa: E402
from vitlab.convert.hf_swin import (  # noqa: E402
    from_hf_swin_state_dict,
    hf_swin_state_to_vitlab,
    load_hf_swin,
    to_hf_swin,
)
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.model import load_pretrained  # noqa: E402
from vitlab.model.swin import SwinConfig, SwinTransformer  # noqa: E402
from vitlab.weights import read_json, save_state_dict, write_json  # noqa: E402

# HF SwinConfig sizes; the grids per stage are in each comment
CONFIGS = {
    # microsoft/swin-tiny-patch4-window7-224's sizes (built here, nothing downloaded): 56, 28, 14, 7 = the window
    "swin_tiny_224": dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                          window_size=7),
    # CIFAR-like: 16, 8, 4 = the window (one unshifted window)
    "cifar": dict(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4),
    # every grid a multiple of the window: 24, 12, 6, 3; gray, no qkv bias, MLP ratio 2
    "window3_gray": dict(image_size=48, patch_size=2, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                         window_size=3, num_channels=1, qkv_bias=False, mlp_ratio=2.0),
    # 9, then an odd merge to 5: not a multiple of 3, but one unshifted block pads the same way in both
    "odd_merge_unshifted": dict(image_size=18, patch_size=2, embed_dim=8, depths=[2, 1], num_heads=[1, 2],
                                window_size=3),
}
NOT_DIVIDED = dict(image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=5)  # 16, 8
SMALLER = dict(image_size=28, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=7)  # ..4


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def randomise(module: torch.nn.Module, perturb, seed: int = 0) -> torch.nn.Module:
    """Every parameter off its init; bias tables (zeros in HF) get N(0, 1), so a wrong offset lookup shows."""
    perturb(module, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in module.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.add_(torch.randn(p.shape, generator=g))
    return module.eval()


def hf_model(cls_name: str, perturb, *, add_pooling_layer: bool = True, **cfg):
    config = transformers.SwinConfig(**cfg)
    cls = getattr(transformers, cls_name)
    m = cls(config, add_pooling_layer=add_pooling_layer) if cls_name == "SwinModel" else cls(config)
    return randomise(m, perturb)


def ours_config(num_classes: int, **hf) -> SwinConfig:
    """The vitlab config of the same sizes, written out independently of the converter."""
    return SwinConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], in_channels=hf.get("num_channels", 3),
                      num_classes=num_classes, embed_dim=hf["embed_dim"], depths=tuple(hf["depths"]),
                      num_heads=tuple(hf["num_heads"]), window_size=hf["window_size"],
                      mlp_ratio=hf.get("mlp_ratio", 4.0), qkv_bias=hf.get("qkv_bias", True),
                      drop_path=hf.get("drop_path_rate", 0.1))  # transformers' default stochastic depth


def images(hf_cfg: dict, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = hf_cfg["image_size"]
    return torch.randn(batch, hf_cfg.get("num_channels", 3), s, s, generator=g)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_swin_model_features_and_pooler(cfg, perturb):
    hf = hf_model("SwinModel", perturb, **cfg)
    ours = from_hf(hf)
    assert isinstance(ours, SwinTransformer) and ours.cfg == ours_config(0, **cfg)
    x = images(cfg)
    with torch.no_grad():
        out = hf(pixel_values=x)
        feats = ours.forward_features(x)  # (B, H, W, C)
        close(feats.flatten(1, 2), out.last_hidden_state)
        close(ours(x), out.pooler_output)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_image_classification_logits(cfg, perturb):
    hf = hf_model("SwinForImageClassification", perturb, num_labels=7, **cfg)
    ours = from_hf(hf)
    assert ours.cfg == ours_config(7, **cfg)
    x = images(cfg)
    with torch.no_grad():
        close(ours(x), hf(pixel_values=x).logits)


def test_headless_classifier_and_model_without_pooler(perturb):
    cfg = CONFIGS["cifar"]
    x = images(cfg)
    hf = hf_model("SwinForImageClassification", perturb, num_labels=0, **cfg)
    ours = from_hf(hf)
    assert ours.cfg.num_classes == 0
    with torch.no_grad():
        close(ours(x), hf(pixel_values=x).logits)  # the pooled features
    hf = hf_model("SwinModel", perturb, add_pooling_layer=False, **cfg)
    ours = from_hf(hf)
    with torch.no_grad():
        close(ours.forward_features(x).flatten(1, 2), hf(pixel_values=x).last_hidden_state)


# transformers 5 in-memory spelling <-> hub-file spelling, written out here independently of the converter
_TO_HUB = [(r"attention\.([qkv])_proj", lambda m: "attention.self." + {"q": "query", "k": "key", "v": "value"}[m[1]]),
           (r"attention\.relative_position_bias\.relative_position_bias_table",
            "attention.self.relative_position_bias_table"),
           (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
           (r"mlp\.fc2", "output.dense")]
_TO_MEM = [(r"attention\.self\.(query|key|value)",
            lambda m: "attention." + {"query": "q", "key": "k", "value": "v"}[m[1]] + "_proj"),
           (r"attention\.self\.relative_position_bias_table",
            "attention.relative_position_bias.relative_position_bias_table"),
           (r"attention\.output\.dense", "attention.o_proj"), (r"intermediate\.dense", "mlp.fc1"),
           (r"(blocks\.\d+\.)output\.dense", r"\1mlp.fc2")]


def respell(state: dict, rules) -> dict:
    out = {}
    for k, v in state.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.mark.parametrize("cls_name", ["SwinModel", "SwinForImageClassification"])
def test_hub_files_and_both_key_spellings(cls_name, tmp_path, perturb):
    cfg = CONFIGS["cifar"]
    hf = hf_model(cls_name, perturb, num_labels=3, **cfg)
    hf.save_pretrained(tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    config = read_json(tmp_path / "config.json")
    hub = disk if any(".attention.self.query." in k for k in disk) else respell(disk, _TO_HUB)
    mem = hf.state_dict()
    mem = mem if any(".attention.q_proj." in k for k in mem) else respell(mem, _TO_MEM)
    # hub files of transformers 4 also hold the (persistent there) relative_position_index buffers
    index = {k.replace("relative_position_bias_table", "relative_position_index"): torch.zeros(49, dtype=torch.long)
             for k in hub if k.endswith("relative_position_bias_table")}
    x = images(cfg)
    with torch.no_grad():
        out = hf(pixel_values=x)
        want = out.pooler_output if cls_name == "SwinModel" else out.logits
        for state in (hub, mem, {**hub, **index}):
            close(from_hf_swin_state_dict(state, config)(x), want)
        close(load_hf_swin(tmp_path)(x), want)


def test_vitlab_to_transformers_dir_and_back(tmp_path, perturb):
    """vitlab -> to_hf files -> transformers.from_pretrained (every tensor used) -> same logits; and back."""
    for num_classes, hf_cls in ((5, transformers.SwinForImageClassification), (0, transformers.SwinModel)):
        cfg = ours_config(num_classes, **CONFIGS["window3_gray"], drop_path_rate=0.0)
        ours = randomise(SwinTransformer(cfg), perturb)
        names = ["ant", "bee", "cow", "doe", "eel"][:num_classes] or None
        state, config = to_hf_swin(ours, class_names=names)
        d = tmp_path / f"hf{num_classes}"
        save_state_dict(state, d / "model.safetensors")
        write_json(d / "config.json", config)
        hf, info = hf_cls.from_pretrained(d, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched key: nothing left at its init
        assert type(hf).__name__ == config["architectures"][0]
        x = images(CONFIGS["window3_gray"], batch=3)
        with torch.no_grad():
            out = hf.eval()(pixel_values=x)
            close(out.logits if num_classes else out.pooler_output, ours(x))
        if num_classes:
            assert hf.config.id2label == dict(enumerate(names))
        back = load_hf_swin(d)
        assert back.cfg == cfg
        for k, v in ours.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("cls_name", ["SwinForImageClassification", "SwinModel"])
def test_convert_cli_hf_dir_to_vitlab_dir(cls_name, tmp_path, perturb, capsys):
    cfg = CONFIGS["cifar"]
    hf = hf_model(cls_name, perturb, id2label={0: "ant", 1: "bee", 2: "cow"}, **cfg)
    hf.save_pretrained(tmp_path / "src")
    assert main(["convert", "--from", "hf", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "converted hf weights" in capsys.readouterr().out
    ours = load_pretrained(tmp_path / "out")
    assert isinstance(ours, SwinTransformer)
    x = images(cfg)
    with torch.no_grad():
        out = hf(pixel_values=x)
        close(ours(x), out.logits if cls_name == "SwinForImageClassification" else out.pooler_output)
    names = SwinTransformer.read_class_names(tmp_path / "out")
    assert names == (["ant", "bee", "cow"] if cls_name == "SwinForImageClassification" else None)


# ---- what does not convert, and why -------------------------------------------------------------------------
def test_grid_the_window_does_not_divide_differs_and_is_refused(perturb):
    """HF pads before the cyclic shift, timm / vitlab after: measured here, then refused both ways."""
    hf = hf_model("SwinModel", perturb, **NOT_DIVIDED)
    cfg = ours_config(0, **NOT_DIVIDED)
    ours = SwinTransformer(cfg)
    ours.load_state_dict(hf_swin_state_to_vitlab(hf.state_dict(), cfg))  # the same weights, no layout check
    x = images(NOT_DIVIDED)
    with torch.no_grad():  # measured: ~0.4 (the padded tokens sit elsewhere in the shifted windows)
        assert (ours.eval().forward_features(x).flatten(1, 2) - hf(pixel_values=x).last_hidden_state).abs().max() > 0.1
    for convert in (lambda: from_hf(hf), lambda: to_hf_swin(ours)):
        with pytest.raises(VitlabError, match="16x16 grid is not a multiple of the 5x5 window") as e:
            convert()
        assert "\n" not in str(e.value)


def test_grid_smaller_than_the_window_fails_in_transformers_and_is_refused(perturb):
    hf = hf_model("SwinForImageClassification", perturb, num_labels=4, **SMALLER)
    x = images(SMALLER)
    with pytest.raises(RuntimeError), torch.no_grad():
        hf(pixel_values=x)  # its 7x7 bias table meets 4x4 windows
    ours = randomise(SwinTransformer(ours_config(4, **SMALLER)), perturb)
    with torch.no_grad():
        assert ours(x).shape == (2, 4)  # vitlab (as timm) shrinks the window to the grid
    for convert in (lambda: from_hf(hf), lambda: to_hf_swin(ours)):
        with pytest.raises(VitlabError, match="stage 2's 4x4 grid is smaller than the 7x7 window"):
            convert()


@pytest.mark.parametrize("change,words", [
    (dict(use_absolute_embeddings=True), "absolute position embeddings"),
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
    (dict(layer_norm_eps=1e-6), "layer_norm_eps=1e-06"),
    (dict(image_size=[32, 48]), "non-square image_size"),
    (dict(model_type="vit"), "model_type 'vit'"),
    (dict(architectures=["SwinForMaskedImageModeling"]), "cannot convert SwinForMaskedImageModeling"),
])
def test_config_that_vitlab_cannot_express(change, words, perturb):
    hf = hf_model("SwinModel", perturb, **CONFIGS["cifar"])
    with pytest.raises(VitlabError, match=words):
        from_hf_swin_state_dict(hf.state_dict(), {**hf.config.to_dict(), **change})


def test_other_swin_classes_are_refused():
    hf = transformers.SwinForMaskedImageModeling(transformers.SwinConfig(**CONFIGS["cifar"]))
    with pytest.raises(VitlabError, match="SwinModel and SwinForImageClassification; got SwinForMaskedImageModeling"):
        from_hf(hf)


def test_missing_extra_and_doubled_weights_are_listed(perturb):
    hf = hf_model("SwinForImageClassification", perturb, num_labels=3, **CONFIGS["cifar"])
    config = hf.config.to_dict()
    state = respell(hf.state_dict(), _TO_HUB)
    del state["swin.encoder.layers.0.downsample.reduction.weight"]
    state["swin.encoder.layers.1.blocks.0.attention.self.extra.weight"] = torch.zeros(2)
    with pytest.raises(VitlabError) as e:
        from_hf_swin_state_dict(state, config)
    msg = str(e.value)
    assert "missing keys: encoder.layers.0.downsample.reduction.weight" in msg
    assert "unmapped keys: encoder.layers.1.blocks.0.attention.self.extra.weight" in msg
    with pytest.raises(VitlabError, match="both key spellings"):
        from_hf_swin_state_dict({**hf.state_dict(), **respell(hf.state_dict(), _TO_HUB)}, config)


@pytest.mark.parametrize("change,words", [
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(norm_eps=1e-6), "layer_norm_eps=1e-06"),
])
def test_to_hf_refuses_what_transformers_cannot_express(change, words):
    cfg = ours_config(3, **CONFIGS["cifar"])
    with pytest.raises(VitlabError, match=words):
        to_hf_swin(SwinTransformer(SwinConfig(**{**cfg.to_dict(), **change})))
