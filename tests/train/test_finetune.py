"""Fine-tuning init from timm / Hugging Face / vitlab sources (random weights), against the source models
themselves: the backbone computes what the source computes (at a new size what timm computes with its own
position resampling); the head is kept or replaced; layer-wise lr decay equals timm's; a linear probe trains
only the head."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from vitlab.errors import VitlabError
from vitlab.model import create_model, parse_variant
from vitlab.train.finetune import freeze_backbone, init_from
from vitlab.train.optim import WarmupCosine, create_optimizer, param_groups

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from vitlab.convert.timm import timm_class, timm_kwargs, to_timm  # noqa: E402

VARIANT = "tutorial/8"  # 48 wide, 4 blocks, 4 heads, 8x8 patches
TIMM_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0)


@pytest.fixture
def perturb():
    """Noise on every parameter, so zero biases or LayerNorm's 1/0 init cannot hide a wrong mapping
    (tests/convert/conftest.py has the same fixture for the converters' tests)."""

    def shift(module, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return module.eval()

    return shift


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def timm_vit(perturb, **kw):
    cfg = parse_variant(VARIANT, image_size=32, num_classes=5, **kw)
    tm = timm_class(cfg)(**timm_kwargs(cfg))  # dynamic_img_size: timm resamples positions at other sizes
    return perturb(tm)


def timm_file(tmp_path, tm):
    path = tmp_path / "timm" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
    return path


# ---- timm -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "pooling": "gap"}])
def test_timm_file_new_head_new_size(tmp_path, perturb, kw):
    tm = timm_vit(perturb, **kw)
    path = timm_file(tmp_path, tm)
    model, prov = init_from(path, variant=VARIANT, image_size=48, num_classes=3)
    assert model.cfg.image_size == 48 and model.cfg.num_classes == 3 and model.cfg.depth == 4
    assert prov["kind"] == "timm" and prov["head"] == "replaced" and prov["replaced"] == ["head.weight", "head.bias"]
    assert prov["resampled"] == {"pos_embed": {"from": [4, 4], "to": [6, 6]}}
    assert prov["files"] == {"model.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert not model.head.weight.any() and not model.head.bias.any()  # zero-initialised classifier
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        close(model.eval().forward_features(x), tm.forward_features(x))  # timm resamples the same way
        close(model.forward_head(model.forward_features(x), pre_logits=True), tm.forward_head(tm.forward_features(x),
                                                                                             pre_logits=True))


def test_timm_hub_config_same_classes_keeps_the_head(tmp_path, perturb):
    tm = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TIMM_ARGS))
    path = timm_file(tmp_path, tm)
    (path.parent / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "num_classes": 5, "model_args": TIMM_ARGS}))
    model, prov = init_from(path.parent, image_size=32, num_classes=5)
    assert prov["head"] == "kept" and prov["replaced"] == [] and prov["resampled"] == {}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(model.eval()(x), tm(x))


# ---- Hugging Face ----------------------------------------------------------------------------------------
HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)


def test_hf_vit_dir(tmp_path, perturb):
    hf = perturb(transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=4)))
    hf.save_pretrained(tmp_path / "hf")
    model, prov = init_from(tmp_path / "hf", image_size=32, num_classes=2, drop_path=0.1)
    assert prov["kind"] == "hf_vit" and prov["head"] == "replaced" and model.cfg.drop_path == 0.1
    assert set(prov["files"]) == {"model.safetensors"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(model.eval().forward_features(x), hf.vit(x).last_hidden_state)
    assert model.head.weight.shape == (2, 32)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_clip_and_siglip_vision_dirs(tmp_path, perturb, family):
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_TINY))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_TINY))
    hf = perturb(hf)
    hf.save_pretrained(tmp_path / family)
    model, prov = init_from(tmp_path / family, image_size=32, num_classes=3)
    assert prov["kind"] == "hf_clip" and prov["source_num_classes"] == 0 and prov["head"] == "replaced"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.eval().forward_features(x)
        close(model.forward_head(feats, pre_logits=True), hf(pixel_values=x).pooler_output)
        assert model(x).shape == (2, 3)


# ---- vitlab ----------------------------------------------------------------------------------------------
def test_vitlab_dir_same_task_is_the_same_model(tmp_path):
    src = create_model("tutorial", seed=1, num_classes=10)
    src.save_pretrained(tmp_path / "run", class_names=[str(i) for i in range(10)])
    model, prov = init_from(tmp_path / "run", image_size=32, num_classes=10)
    assert prov["kind"] == "vitlab" and prov["head"] == "kept" and prov["dropped"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    smaller, prov = init_from(tmp_path / "run", image_size=16, num_classes=4)
    assert prov["resampled"]["pos_embed"] == {"from": [8, 8], "to": [4, 4]}
    assert torch.equal(smaller.pos_embed[:, :1], src.pos_embed[:, :1])  # the class token's position is kept
    assert smaller(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_bad_sources_are_one_line_errors(tmp_path, perturb):
    with pytest.raises(VitlabError, match="not found"):
        init_from(tmp_path / "nothing", image_size=32, num_classes=2)
    path = timm_file(tmp_path, timm_vit(perturb))
    with pytest.raises(VitlabError, match="pass its vitlab variant"):
        init_from(path, image_size=32, num_classes=2)
    with pytest.raises(VitlabError, match="only dropout, attn_dropout, head_dropout, drop_path can be changed, not "
                                          "width"):
        init_from(path, variant=VARIANT, image_size=32, num_classes=2, width=64)
    with pytest.raises(VitlabError, match="not divisible by patch_size 8"):
        init_from(path, variant=VARIANT, image_size=36, num_classes=2)


# ---- layer-wise lr decay and the linear probe (vitlab.train.optim) -----------------------------------------
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "pooling": "map", "pre_norm": True},
                                {"pooling": "gap", "layerscale_init": 1e-5}])
def test_layer_decay_groups_equal_timms(kw):
    from timm.optim import param_groups_layer_decay

    ours_model = create_model(parse_variant("tutorial", depth=3, **kw), seed=0)
    tm = timm_class(ours_model.cfg)(**timm_kwargs(ours_model.cfg))
    tm.load_state_dict(to_timm(ours_model))
    theirs = param_groups_layer_decay(tm, weight_decay=0.05, no_weight_decay_list=ours_model.no_weight_decay(),
                                      layer_decay=0.65)
    names = {id(p): n for n, p in tm.named_parameters()}
    want = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    got = {n: (g["lr_scale"], g["weight_decay"])
           for g in param_groups(ours_model, weight_decay=0.05, layer_decay=0.65) for n in g["names"]}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n]), n
    assert len({s for s, _ in got.values()}) == 5  # embeddings, 3 blocks, head: all different


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_layer_decay_scales_each_groups_lr(optimizer):
    model = create_model(parse_variant("tutorial", depth=2), seed=0)
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, optimizer=optimizer, layer_decay=0.5)
    sched = WarmupCosine(base_lr=1e-3, total_steps=10)
    assert sched.apply(opt, 0) == pytest.approx(1e-3)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["head.weight"])] == pytest.approx(1e-3)
    assert by_param[id(names["blocks.1.mlp.fc1.weight"])] == pytest.approx(5e-4)
    assert by_param[id(names["blocks.0.attn.qkv.weight"])] == pytest.approx(2.5e-4)
    assert by_param[id(names["patch_embed.proj.weight"])] == pytest.approx(1.25e-4)
    assert len(by_param) == len(names)  # every parameter in exactly one group


def test_freeze_backbone_trains_only_the_head():
    model = create_model(parse_variant("tutorial", depth=2, num_classes=3), seed=0)
    assert freeze_backbone(model) == ["head.weight", "head.bias"]
    opt = create_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    with pytest.raises(VitlabError, match="no trainable parameters"):
        create_optimizer(create_model("tutorial", num_classes=0).requires_grad_(False), lr=1e-3, weight_decay=0)
    with pytest.raises(VitlabError, match="needs a classifier head"):
        freeze_backbone(create_model("tutorial", num_classes=0))
