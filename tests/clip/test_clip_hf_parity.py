"""Converted CLIP / SigLIP models give transformers' outputs (random-init small configs of the real classes)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vitlab.clip import CLIPModel, SigLIPModel  # noqa: E402
from vitlab.convert import from_hf  # noqa: E402
from vitlab.convert.hf_clip import convert_hf_clip, from_hf_clip, load_hf_clip  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.model.vit import VisionTransformer  # noqa: E402

ATOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=0)


def _clip(seed=0, **text):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config={**TEXT, **text}, vision_config=VISION, projection_dim=24)
    return transformers.CLIPModel(cfg).eval()


def _siglip(seed=0):
    torch.manual_seed(seed)
    text = {**TEXT, "hidden_size": 32, "intermediate_size": 80}  # SigLIP's text head maps to the vision width
    m = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=VISION)).eval()
    with torch.no_grad():  # HF initialises both to 0; give them values that would expose a mix-up
        m.logit_scale.fill_(2.3)
        m.logit_bias.fill_(-4.5)
    return m


def _inputs(seed=1, eos=99):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(2, 90, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 7, 3, 9)):  # texts of different lengths, right-padded after their EOS
        ids[row, n - 1] = eos
        ids[row, n:] = 0
        mask[row, n:] = 0
    return pixels, ids, mask


def _assert_close(a, b, what):
    err = (a - b).abs().max().item()
    assert err < ATOL, f"{what}: max abs difference {err:.2e}"


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_model_parity(family, use_mask):
    """Features, normalised embeddings and both logit matrices; with and without a padding mask."""
    hf = _clip() if family == "clip" else _siglip()
    ours = from_hf(hf)
    pixels, ids, mask = _inputs()
    mask = mask if use_mask else None
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        per_image, per_text = ours(pixels, ids, attention_mask=mask)
        _assert_close(ours.encode_image(pixels, normalize=False), img, "image features")
        _assert_close(ours.encode_text(ids, attention_mask=mask, normalize=False), txt, "text features")
        _assert_close(ours.encode_image(pixels), out.image_embeds, "normalised image embeddings")
        _assert_close(ours.encode_text(ids, attention_mask=mask), out.text_embeds, "normalised text embeddings")
    assert per_image.shape == (3, 4)
    _assert_close(per_image, out.logits_per_image, "logits_per_image")
    _assert_close(per_text, out.logits_per_text, "logits_per_text")
    if family == "clip":
        assert type(ours) is CLIPModel and ours.cfg.text.causal and ours.cfg.text.pooling == "eos"
    else:
        assert isinstance(ours, SigLIPModel) and not ours.cfg.text.causal and ours.cfg.text.pooling == "last"
        assert ours.logit_bias.item() == pytest.approx(-4.5)


def test_clip_legacy_eos_id_pools_at_argmax():
    """Configs with eos_token_id 2 pool at the largest id (transformers keeps that for old checkpoints)."""
    hf = _clip(eos_token_id=2)
    ours = from_hf_clip(hf)
    assert ours.cfg.text.pooling == "argmax"
    _, ids, _ = _inputs(eos=99)  # 99 is the largest id in each row, not the configured EOS
    with torch.no_grad():
        _assert_close(ours.encode_text(ids), hf(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds,
                      "text embeddings")


def test_clip_gelu_variant_parity():
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(text_config={**TEXT, "hidden_act": "gelu"},
                                  vision_config={**VISION, "hidden_act": "gelu"}, projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    ours = from_hf_clip(hf)
    assert ours.cfg.vision.activation == "gelu" and ours.cfg.text.activation == "gelu"
    pixels, ids, _ = _inputs()
    with torch.no_grad():
        _assert_close(ours(pixels, ids)[0], hf(input_ids=ids, pixel_values=pixels).logits_per_image, "logits")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_only_models_pooled_output(family):
    torch.manual_seed(4)
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).eval()
    ours = from_hf(hf)
    assert isinstance(ours, VisionTransformer) and ours.cfg.num_classes == 0
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        _assert_close(ours(pixels), ref.pooler_output, "pooled output")
        if family == "siglip":  # post_layernorm covers every token
            _assert_close(ours.forward_features(pixels), ref.last_hidden_state, "last hidden state")
    # hub files written by transformers < 5 prefix every key with vision_model.
    prefixed = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    again = convert_hf_clip(prefixed, hf.config.to_dict())
    with torch.no_grad():
        _assert_close(again(pixels), ref.pooler_output, "pooled output (prefixed keys)")


@pytest.mark.parametrize("make", [_clip, _siglip])
def test_hub_directory_converts(make, tmp_path):
    """What save_pretrained writes (config.json with omitted defaults + safetensors) converts the same way."""
    hf = make()
    hf.save_pretrained(tmp_path)
    ours = load_hf_clip(tmp_path)
    pixels, ids, _ = _inputs()
    with torch.no_grad():
        _assert_close(ours(pixels, ids)[0], hf(input_ids=ids, pixel_values=pixels).logits_per_image, "logits")


def test_unmapped_and_missing_keys_are_listed():
    hf = _clip()
    state, config = dict(hf.state_dict()), hf.config.to_dict()
    state["text_model.extra.weight"] = torch.zeros(2)
    with pytest.raises(VitlabError, match=r"unmapped keys: text_model\.extra\.weight"):
        convert_hf_clip(state, config, arch="CLIPModel")
    state.pop("text_model.extra.weight")
    state.pop("vision_model.pre_layrnorm.weight")
    with pytest.raises(VitlabError, match=r"missing keys: vision_model\.pre_layrnorm\.weight"):
        convert_hf_clip(state, config, arch="CLIPModel")
    with pytest.raises(VitlabError, match="supported are"):
        convert_hf_clip(state, config, arch="CLIPTextModel")
