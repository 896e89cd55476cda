"""Hugging Face ViT interop: converted models against the real transformers ViT classes."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from vitlab.convert import from_hf  # noqa: E402
from vitlab.convert.hf_vit import from_hf_vit_state_dict  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def hf_model(cls_name: str, perturb, seed: int = 0, add_pooling_layer: bool = True, **cfg):
    config = transformers.ViTConfig(**{**TINY, **cfg})
    cls = getattr(transformers, cls_name)
    m = cls(config, add_pooling_layer=add_pooling_layer) if cls_name == "ViTModel" else cls(config)
    m.set_attn_implementation("eager")  # so output_attentions returns the probabilities
    return perturb(m, seed=seed)


CASES = [
    ("default", {}),
    ("gelu_new", dict(hidden_act="gelu_new")),
    ("gelu_pytorch_tanh", dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
    ("quick_gelu", dict(hidden_act="quick_gelu")),
    ("no_qkv_bias", dict(qkv_bias=False)),
    ("size40_patch5_gray", dict(image_size=40, patch_size=5, num_attention_heads=4, num_channels=1)),
]


@pytest.mark.parametrize("cfg", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_vit_model_features_pooler_and_attentions(cfg, perturb):
    hf = hf_model("ViTModel", perturb, **cfg)
    ours = from_hf(hf)
    assert ours.cfg.num_classes == 0 and ours.cfg.pre_logits_dim == TINY["hidden_size"]
    size = hf.config.image_size
    x = torch.randn(2, hf.config.num_channels, size, size)
    with torch.no_grad():
        out = hf(x, output_attentions=True)
        feats = ours.forward_features(x)
        pooled, attns = ours(x, return_attention=True)
    close(feats, out.last_hidden_state)
    close(ours.forward_head(feats), out.pooler_output)
    close(pooled, out.pooler_output)
    assert len(attns) == len(out.attentions) == hf.config.num_hidden_layers
    for a, b in zip(attns, out.attentions):
        close(a, b)


@pytest.mark.parametrize("num_labels", [7, 0])
def test_image_classification_logits(num_labels, perturb):
    hf = hf_model("ViTForImageClassification", perturb, num_labels=num_labels)
    ours = from_hf(hf)
    assert ours.cfg.num_classes == num_labels and ours.cfg.pre_logits_dim == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(x, output_attentions=True)
        logits, attns = ours(x, return_attention=True)
    close(logits, out.logits)
    for a, b in zip(attns, out.attentions):
        close(a, b)


def test_vit_model_without_pooler(perturb):
    hf = hf_model("ViTModel", perturb, add_pooling_layer=False)
    ours = from_hf(hf)
    assert ours.pre_logits is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(x)
        close(ours.forward_features(x), out.last_hidden_state)
        close(ours(x), out.last_hidden_state[:, 0])


# Hub-file spelling -> transformers-5 in-memory spelling, written out here independently of the converter.
_TO_V5 = [(r"encoder\.layer\.", "layers."), (r"attention\.attention\.query", "attention.q_proj"),
          (r"attention\.attention\.key", "attention.k_proj"),
          (r"attention\.attention\.value", "attention.v_proj"),
          (r"attention\.output\.dense", "attention.o_proj"), (r"intermediate\.dense", "mlp.fc1"),
          (r"(layers\.\d+\.)output\.dense", r"\1mlp.fc2")]
_TO_HUB = [(r"layers\.(\d+)\.", r"encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
           (r"attention\.k_proj", "attention.attention.key"),
           (r"attention\.v_proj", "attention.attention.value"),
           (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
           (r"mlp\.fc2", "output.dense")]


def respell(state: dict, rules) -> dict:
    out = {}
    for k, v in state.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.mark.parametrize("cls_name", ["ViTModel", "ViTForImageClassification"])
def test_hub_files_and_both_key_spellings(cls_name, tmp_path, perturb):
    hf = hf_model(cls_name, perturb, num_labels=3)
    hf.save_pretrained(tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    mem = hf.state_dict()
    # Build whichever spelling transformers did not give us, so both are always exercised.
    legacy_on_disk = any(re.search(r"(^|\.)encoder\.layer\.", k) for k in disk)
    hub = disk if legacy_on_disk else respell(disk, _TO_HUB)
    v5 = mem if any(re.search(r"(^|\.)layers\.\d+\.", k) for k in mem) else respell(mem, _TO_V5)
    assert any("attention.attention.query" in k for k in hub) and any("q_proj" in k for k in v5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(x)
        want = out.pooler_output if cls_name == "ViTModel" else out.logits
        for state in (hub, v5):
            ours = from_hf_vit_state_dict(state, config)
            close(ours(x), want)


def _hub_state(perturb):
    hf = hf_model("ViTForImageClassification", perturb, num_labels=3)
    return respell(hf.state_dict(), _TO_HUB), hf.config.to_dict()


def test_missing_extra_and_misshaped_weights_are_listed(perturb):
    state, config = _hub_state(perturb)
    del state["vit.encoder.layer.1.layernorm_after.bias"]
    state["vit.encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)
    state["classifier.weight"] = torch.zeros(3, 33)
    with pytest.raises(VitlabError) as e:
        from_hf_vit_state_dict(state, config)
    msg = str(e.value)  # all three problems in one message
    assert "unmapped keys: vit.encoder.layer.0.attention.attention.extra.weight" in msg
    assert "missing keys: blocks.1.norm2.bias" in msg
    assert "head.weight: file (3, 33) vs model (3, 32)" in msg


def test_incomplete_or_misshaped_qkv_is_listed(perturb):
    state, config = _hub_state(perturb)
    del state["vit.encoder.layer.0.attention.attention.key.weight"]
    state["vit.encoder.layer.1.attention.attention.value.bias"] = torch.zeros(31)
    with pytest.raises(VitlabError) as e:
        from_hf_vit_state_dict(state, config)
    msg = str(e.value)
    assert "blocks.0.attn.qkv.weight needs query, key and value" in msg
    assert "vit.encoder.layer.1.attention.attention.value.bias (31,)" in msg


def test_both_spellings_at_once_is_an_error(perturb):
    hf = hf_model("ViTModel", perturb)
    mem = hf.state_dict()
    state = {**mem, **respell(mem, _TO_HUB)}
    with pytest.raises(VitlabError, match="both"):
        from_hf_vit_state_dict(state, hf.config.to_dict())


@pytest.mark.parametrize("change,words", [
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
    (dict(model_type="clip"), "model_type 'clip'"),
    (dict(image_size=[32, 48]), "square"),
])
def test_config_that_vitlab_cannot_express(change, words, perturb):
    hf = hf_model("ViTModel", perturb)
    with pytest.raises(VitlabError, match=words):
        from_hf_vit_state_dict(hf.state_dict(), {**hf.config.to_dict(), **change})


def test_mask_token_is_not_silently_dropped():
    hf = transformers.ViTModel(transformers.ViTConfig(**TINY), use_mask_token=True)
    with pytest.raises(VitlabError, match="embeddings.mask_token"):
        from_hf(hf)
