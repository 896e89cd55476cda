import pytest

from vitlab.model import VARIANTS, ViTConfig, parse_variant


def test_variant_table_is_big_vision():
    # big_vision's table (width, depth, heads, mlp): the reference notes list these rows.
    assert VARIANTS["Ti"] == (192, 12, 3, 768)
    assert VARIANTS["S"] == (384, 12, 6, 1536)
    assert VARIANTS["B"] == (768, 12, 12, 3072)
    assert VARIANTS["L"] == (1024, 24, 16, 4096)
    assert VARIANTS["H"] == (1280, 32, 16, 5120)


def test_parse_variant_patch_and_overrides():
    cfg = parse_variant("Ti/4", image_size=32, num_classes=10)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size) == (192, 12, 3, 768, 4)
    assert cfg.num_tokens == 65 and cfg.grid_size == 8
    seed = parse_variant("tutorial")
    assert (seed.width, seed.depth, seed.heads, seed.mlp_dim, seed.patch_size, seed.image_size) == \
        (48, 4, 4, 192, 4, 32)


@pytest.mark.parametrize("kw, words", [
    (dict(width=50, heads=4), "divisible by heads"),
    (dict(image_size=30, patch_size=4), "not divisible by patch_size"),
    (dict(pooling="max"), "pooling"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(activation="relu6"), "activation"),
    (dict(class_token=False, pooling="cls"), "class_token"),
    (dict(drop_path=1.5), "drop_path"),
])
def test_invalid_config_says_what_to_change(kw, words):
    with pytest.raises(ValueError, match=words):
        ViTConfig(**kw)


@pytest.mark.parametrize("bad", ["X/4", "Ti/x", "", "Ti/4/2"])
def test_unknown_variant(bad):
    with pytest.raises(ValueError, match="unknown model variant"):
        parse_variant(bad)


def test_unknown_override_field():
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        parse_variant("Ti/4", widht=3)


def test_dict_round_trip():
    cfg = parse_variant("S/8", image_size=64, reg_tokens=4, pooling="gap", layerscale_init=1e-5)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
