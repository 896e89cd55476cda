"""Model directories (save_pretrained / from_pretrained) and seeded creation, shared by ViT and CLIP."""

import pytest
import torch

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.model import CLIPModel, SigLIPModel, create_clip
from vitlab.errors import VitlabError
from vitlab.model import VisionTransformer, create_model, parse_variant
from vitlab.model.hub import seeded


def test_vit_round_trip_with_class_names(tmp_path):
    model = create_model("tutorial", seed=0, num_classes=3)
    model.save_pretrained(tmp_path, class_names=["a", "b", "c"])
    back = VisionTransformer.from_pretrained(tmp_path)
    assert back.cfg == model.cfg and not back.training
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert VisionTransformer.read_class_names(tmp_path) == ["a", "b", "c"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_round_trip_picks_the_class(tmp_path, kind):
    vision = parse_variant("tutorial", num_classes=0, **({"pooling": "map", "class_token": False}
                                                           if kind == "siglip" else {}))
    text = TextConfig(width=48, depth=1, heads=4, mlp_dim=96, context_length=8, causal=kind == "clip",
                      pooling="eos" if kind == "clip" else "last", eos_token_id=2)
    model = create_clip(CLIPConfig(vision=vision, text=text, kind=kind, embed_dim=48), seed=0)
    model.save_pretrained(tmp_path)
    back = CLIPModel.from_pretrained(tmp_path)
    assert type(back) is (SigLIPModel if kind == "siglip" else CLIPModel)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(VitlabError, match="vitlab_clip"):
        VisionTransformer.from_pretrained(tmp_path)  # the wrong class says what the directory holds


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(VitlabError, match="not a directory"):
        VisionTransformer.from_pretrained(tmp_path / "nope")


def test_seeded_creation_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = create_model("tutorial", seed=7), create_model("tutorial", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = create_model("tutorial", seed=8)
    assert not torch.equal(a.pos_embed, c.pos_embed)
    with seeded(None):  # no seed: draws from the global RNG as usual
        torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), state)


def test_a_bad_field_in_config_json_names_the_file(tmp_path):
    import json

    create_model("tutorial", seed=0).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["width"] = "48"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VitlabError, match=r"config\.json.*width"):
        VisionTransformer.from_pretrained(tmp_path)
