import pytest

from vitlab.model import create_model

# 16x16 images, 4x4 patches: a 4x4 grid of 16 patches; small enough that every test runs in milliseconds.
TINY = dict(width=16, depth=2, heads=2, mlp_dim=32, image_size=16, patch_size=4, num_classes=3)


@pytest.fixture
def tiny():
    """Factory: tiny(pooling="gap", class_token=False, ...) -> a seeded, eval-mode VisionTransformer."""

    def make(**overrides):
        return create_model("tutorial", seed=0, **{**TINY, **overrides}).eval()

    return make
