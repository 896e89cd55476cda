"""CLIPModel / SigLIPModel behaviour, the byte tokenizer, save/load and zero-shot classification."""

import json
import math

import pytest
import torch

from vitlab.clip import CLIPConfig, CLIPModel, SigLIPModel, TextConfig, create_clip
from vitlab.clip.tokenizer import ByteTokenizer
from vitlab.clip.zeroshot import fill_template, zero_shot_classifier, zero_shot_predict
from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.modeldir import open_model_dir
from vitlab.preprocess import siglip_preprocess

TOK = ByteTokenizer(context_length=24)


def tiny(kind: str, seed: int = 0) -> CLIPModel:
    vision = ViTConfig(image_size=16, patch_size=4, num_classes=0, width=32, depth=1, heads=2, mlp_dim=64,
                       class_token=kind == "clip", pooling="cls" if kind == "clip" else "map")
    text = TextConfig(vocab_size=TOK.vocab_size, context_length=24, width=24, depth=1, heads=2, mlp_dim=48,
                      causal=kind == "clip", pooling="eos" if kind == "clip" else "last", eos_token_id=TOK.EOS)
    return create_clip(CLIPConfig(vision=vision, text=text, kind=kind, embed_dim=32), seed=seed).eval()


def test_byte_tokenizer():
    ids = TOK("Cat")[0].tolist()
    assert ids[:5] == [256, ord("c"), ord("a"), ord("t"), 257] and set(ids[5:]) == {258}
    assert len(ids) == 24
    long = TOK("x" * 100)[0].tolist()
    assert long[0] == 256 and long[-1] == 257 and long.count(257) == 1  # cut so that EOS still fits
    assert TOK.decode(TOK("café ☕")[0]) == "café ☕"
    with pytest.raises(VitlabError):
        ByteTokenizer(context_length=2)


def test_init_values_and_logits():
    clip, siglip = tiny("clip"), tiny("siglip")
    assert isinstance(siglip, SigLIPModel) and type(clip) is CLIPModel
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and clip.logit_bias is None
    assert siglip.logit_scale.item() == pytest.approx(math.log(10)) and siglip.logit_bias.item() == -10
    assert isinstance(siglip.visual_projection, torch.nn.Identity) and siglip.text_projection.bias is not None
    assert clip.visual_projection.bias is None and clip.text_projection.bias is None
    x, ids = torch.randn(3, 3, 16, 16), TOK(["a cat", "a dog"])
    with torch.no_grad():
        img, txt = clip.encode_image(x), clip.encode_text(ids)
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
        raw = clip.encode_image(x, normalize=False)
        torch.testing.assert_close(img, raw / raw.norm(dim=-1, keepdim=True))
        per_image, per_text = clip(x, ids)
        assert per_image.shape == (3, 2) and torch.equal(per_text, per_image.T)
        torch.testing.assert_close(per_image, math.exp(math.log(1 / 0.07)) * img @ txt.T)
        clip.logit_scale.fill_(10.0)  # exp(10) is clamped to 100
        torch.testing.assert_close(clip(x, ids)[0], 100 * img @ txt.T)
        s_img, s_txt = siglip.encode_image(x), siglip.encode_text(ids)
        torch.testing.assert_close(siglip(x, ids)[0], 10 * s_img @ s_txt.T - 10)


def test_clip_text_is_causal_and_pools_at_first_eos():
    clip, siglip = tiny("clip"), tiny("siglip")
    a, b = TOK(["a photo of a cat"]), TOK(["a photo of a dog"])
    n = 1 + len("a photo of a ")  # tokens before the class name differ in neither
    with torch.no_grad():
        fa, fb = clip.text.forward_features(a), clip.text.forward_features(b)
        torch.testing.assert_close(fa[:, :n], fb[:, :n])  # causal: later tokens do not leak backwards
        assert not torch.allclose(fa[:, n:], fb[:, n:])
        sa, sb = siglip.text.forward_features(a), siglip.text.forward_features(b)
        assert not torch.allclose(sa[:, :n], sb[:, :n])  # SigLIP attends both ways
        eos = (a[0] == TOK.EOS).nonzero()[0].item()
        torch.testing.assert_close(clip.text(a), fa[:, eos])
        torch.testing.assert_close(siglip.text(a), sa[:, -1])


def test_config_validation():
    with pytest.raises(VitlabError, match="num_classes=0"):
        CLIPConfig(vision=ViTConfig(num_classes=10))
    with pytest.raises(VitlabError, match="embed_dim"):
        CLIPConfig(vision=ViTConfig(num_classes=0, width=64, heads=4, mlp_dim=64, depth=1), kind="siglip",
                   embed_dim=32)
    with pytest.raises(VitlabError, match="eos_token_id"):
        TextConfig(pooling="eos")
    with pytest.raises(VitlabError, match="kind"):
        CLIPConfig(kind="align")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_save_load_round_trip(kind, tmp_path):
    model = tiny(kind)
    model.save_pretrained(tmp_path, tokenizer=TOK, preprocess=siglip_preprocess(16))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "vitlab_clip" and cfg["kind"] == kind and cfg["tokenizer"]["type"] == "bytes"
    md = open_model_dir(tmp_path)
    loaded, tok, pre = md.model, md.tokenizer, md.preprocess
    assert md.kind == kind and md.origin == "vitlab_clip"
    assert type(loaded) is type(model) and pre == siglip_preprocess(16)
    assert isinstance(tok, ByteTokenizer) and tok.context_length == 24
    x, ids = torch.randn(2, 3, 16, 16), tok(["a", "b c"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ids)[0], model(x, ids)[0], rtol=0, atol=0)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(VitlabError, match="safetensors"):
        CLIPModel.from_pretrained(tmp_path)


def test_zeroshot_rejects_a_vit_dir_in_one_line(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.model import create_model

    create_model("tutorial").save_pretrained(tmp_path)
    assert main(["zeroshot", str(tmp_path), "--classes", "a,b", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vitlab zeroshot: error: {tmp_path} holds a ViT; vitlab zeroshot takes a CLIP model, SigLIP model"]


def test_zero_shot_classifier_and_predict():
    model = tiny("clip")
    templates = ["a photo of a {}.", "a drawing of a {class}."]
    classes = ["cat", "dog", "ship"]
    weights = zero_shot_classifier(model, TOK, classes, templates)
    assert weights.shape == (3, 32)
    with torch.no_grad():
        for c, name in enumerate(classes):  # renormalised mean of the two prompts' unit vectors
            e = model.encode_text(TOK([f"a photo of a {name}.", f"a drawing of a {name}."]))
            torch.testing.assert_close(weights[c], (e[0] + e[1]) / (e[0] + e[1]).norm())
    x = torch.randn(5, 3, 16, 16)
    probs = zero_shot_predict(model, weights, x, batch_size=2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    siglip = tiny("siglip")
    w = zero_shot_classifier(siglip, TOK, classes)
    p = zero_shot_predict(siglip, w, x)
    with torch.no_grad():
        torch.testing.assert_close(p, siglip.logits(siglip.encode_image(x), w).sigmoid())
    with pytest.raises(VitlabError, match="placeholder"):
        fill_template("a photo", "cat")
