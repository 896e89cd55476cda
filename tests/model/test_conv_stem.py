"""The conv stem (ViTConfig.stem="conv"): same token grid, counted FLOPs, state saved, bf16 training intact."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.errors import VitlabError
from vitlab.inspect import attention_rollout
from vitlab.model import VisionTransformer, create_model, flops_per_image, parse_variant
from vitlab.model.flops import stem_macs
from vitlab.speed import TrainStep


def test_conv_stem_ends_at_the_patchify_grid():
    conv, patchify = create_model("cifar128", stem="conv", seed=0), create_model("cifar128", seed=0)
    x = torch.randn(2, 3, 32, 32)
    assert conv.forward_features(x).shape == patchify.forward_features(x).shape == (2, 65, 128)
    assert conv.cfg.conv_stem_channels == (32, 64)  # width/4, width/2: one 3x3 conv per halving
    assert sum(isinstance(m, torch.nn.Conv2d) for m in conv.patch_embed.modules()) == 3
    assert conv.forward_intermediates(x, indices=1, intermediates_only=True)[0].shape == (2, 128, 8, 8)
    assert "(conv stem)" in conv.summary() and "(conv stem)" not in patchify.summary()
    with pytest.raises(VitlabError, match="power of 2"):
        parse_variant("cifar128", stem="conv", patch_size=6, image_size=36)
    with pytest.raises(VitlabError, match="stem_channels"):
        parse_variant("cifar128", stem="conv", stem_channels=(16,))


@pytest.mark.parametrize("kw", [dict(), dict(patch_size=8), dict(image_size=48), dict(stem_channels=(24, 40))])
def test_flops_match_torch_flop_counter(kw):
    cfg = parse_variant("cifar128", stem="conv", **kw)
    model = VisionTransformer(cfg).eval().requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, cfg.image_size, cfg.image_size), return_attention=True)  # explicit attention
    assert abs(flops_per_image(cfg) - counter.get_total_flops()) / counter.get_total_flops() < 0.01


def test_default_conv_stem_costs_at_most_15_percent():
    for name in ("tutorial", "cifar128", "cifar192"):
        cfg = parse_variant(name, stem="conv")
        assert 2 * stem_macs(cfg) / flops_per_image(cfg) < 0.15, name


def test_round_trip_keeps_batchnorm_statistics(tmp_path):
    model = create_model("tutorial", stem="conv", seed=0).train()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)  # moves the running statistics
    model.save_pretrained(tmp_path)
    back = VisionTransformer.from_pretrained(tmp_path)
    bn = back.patch_embed.convs[1]
    assert bn.num_batches_tracked.item() == 1 and not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))


def test_attention_maps_and_rollout_still_work():
    model = create_model("tutorial", stem="conv", seed=0).eval()
    with torch.no_grad():
        _, attns = model.forward_attention(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 65))
    assert attention_rollout(attns, num_prefix_tokens=1).shape == (2, 65, 65)


def test_bf16_pure_step_updates_the_master_batchnorm_statistics():
    """The bf16 copy runs the forward; its running statistics must reach the fp32 model that is saved."""
    stats = {}
    for precision in ("fp32", "bf16-pure"):
        model = create_model("tutorial", stem="conv", seed=0, depth=1)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), precision=precision)
        g = torch.Generator().manual_seed(0)
        step(torch.randn(16, 3, 32, 32, generator=g) * 2 + 0.5, torch.randint(0, 10, (16,), generator=g))
        bn = model.patch_embed.convs[1]
        assert bn.running_mean.dtype == torch.float32 and bn.num_batches_tracked.item() == 1
        stats[precision] = (bn.running_mean.clone(), bn.running_var.clone())
    for a, b in zip(stats["fp32"], stats["bf16-pure"]):
        assert ((a - b).norm() / a.norm()).item() < 0.02
