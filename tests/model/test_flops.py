"""FLOPs per image and MFU against torch's own FlopCounterMode on real models (matmul FLOPs, 2 per MAC)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.model import VisionTransformer, estimate_mfu, flops_per_image, parse_variant
from vitlab.model.flops import stem_macs

CASES = [("tutorial", {}), ("Ti/4", dict(image_size=32, num_classes=10)),
         ("tutorial", dict(pooling="map", class_token=False)), ("tutorial", dict(reg_tokens=2, pre_logits_dim=32))]


def counted_flops(cfg, *, training: bool, batch: int = 2) -> float:
    """FLOPs per image FlopCounterMode sees in a forward (and, training, the backward of a loss)."""
    model = VisionTransformer(cfg).train(training).requires_grad_(training)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        # the explicit-attention path, since the counter does not see inside CPU fused SDPA
        logits, _ = model(x, return_attention=True)
        if training:
            logits.logsumexp(-1).sum().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("variant, kw", CASES)
def test_forward_flops_match_torch_flop_counter(variant, kw):
    cfg = parse_variant(variant, **kw)
    measured = counted_flops(cfg, training=False)
    assert abs(flops_per_image(cfg) - measured) / measured < 0.01


@pytest.mark.parametrize("variant, kw", CASES[:2])
def test_training_flops_are_forward_plus_twice_for_backward(variant, kw):
    cfg = parse_variant(variant, **kw)
    measured = counted_flops(cfg, training=True)
    # backward is two matmuls per forward one, except the stem's: the images need no gradient
    assert measured == pytest.approx(3 * counted_flops(cfg, training=False) - 2 * stem_macs(cfg), rel=1e-6)
    assert abs(flops_per_image(cfg, training=True) - measured) / measured < 0.02


def test_mfu_is_counted_flops_times_rate_over_peak():
    cfg = parse_variant("tutorial")
    images_per_second, peak = 1500.0, 2.0e12
    train = counted_flops(cfg, training=True) * images_per_second / peak
    infer = counted_flops(cfg, training=False) * images_per_second / peak
    assert estimate_mfu(cfg, images_per_second, peak) == pytest.approx(train, rel=0.02)
    assert estimate_mfu(cfg, images_per_second, peak, training=False) == pytest.approx(infer, rel=0.01)
