"""The variant table: the tutorial's model by its own name, the recipes' rows, the old name still working."""

import pytest

from vitlab.model import VARIANTS, create_model, parse_variant
from vitlab.model.config import DEPRECATED_VARIANTS


def test_tutorial_model_is_the_blog_posts_config():
    cfg = parse_variant("tutorial")  # Tin Nguyen, "Implementing Vision Transformer (ViT) from Scratch"
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim) == (48, 4, 4, 4 * 48)
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes, cfg.qkv_bias) == (32, 4, 10, True)


def test_seed_is_a_deprecated_alias_of_tutorial():
    assert DEPRECATED_VARIANTS["seed"] == "tutorial" and "seed" not in VARIANTS
    with pytest.warns(FutureWarning, match="tutorial"):
        old = parse_variant("seed/2", image_size=16)
    assert old == parse_variant("tutorial/2", image_size=16)
    with pytest.warns(FutureWarning):
        model = create_model("seed", seed=0)  # the old call still builds the same model
    assert model.cfg == create_model("tutorial", seed=0).cfg


@pytest.mark.parametrize("name", ["cifar128", "cifar192"])
def test_cifar_rows_are_32px_patch4_models(name):
    cfg = parse_variant(name)
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes) == (32, 4, 10)
    assert cfg.mlp_dim == 2 * cfg.width and cfg.width % cfg.heads == 0


def test_summary_line():
    model = create_model("cifar128", seed=0)
    assert model.summary() == f"cifar128 128w 6d 4h /4 32px ({model.num_params() / 1e6:.2f}M params)"


def test_the_test_row_is_a_tiny_cifar_model():
    """`test` (as timm's test_vit) is the tutorial's model shrunk: what the tests build instead of spelling it out."""
    cfg = parse_variant("test")
    assert cfg == parse_variant("tutorial", width=16, depth=1, heads=2, mlp_dim=32)
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes) == (32, 4, 10)
    model = create_model("test", seed=0)
    assert model.num_params() < 10_000 and model.summary().startswith("test 16w 1d 2h /4 32px")
