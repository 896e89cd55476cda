"""The DeiT distillation token (ViTConfig.distill_token): timm's VisionTransformerDistilled, number for number."""

import importlib.util

import pytest
import torch

from vitlab.model import VisionTransformer, create_model

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@needs_timm
def test_equals_timm_deit_distilled_in_eval_and_in_distilled_training():
    from timm.models.deit import VisionTransformerDistilled

    from vitlab.bench import timm_twin

    ours = create_model("tutorial", distill_token=True, seed=0).eval()
    theirs = timm_twin(ours).eval()
    assert isinstance(theirs, VisionTransformerDistilled)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)  # the mean of the two heads
    ours.train().set_distilled_training(True)
    theirs.train().set_distilled_training(True)
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_two_heads_and_their_mean():
    model = create_model("tutorial", distill_token=True, seed=0)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape[1] == 64 + 2
    assert "dist_token" in model.no_weight_decay() and "dist_token" in dict(model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    model.train().set_distilled_training(True)
    torch.manual_seed(0)
    cls_logits, dist_logits = model(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), (cls_logits + dist_logits).detach() / 2, rtol=1e-5, atol=1e-5)
    model.set_distilled_training(False)
    assert model.train()(x).shape == (2, 10)  # not in distilled training: one tensor, as usual


def test_round_trip(tmp_path):
    model = create_model("tutorial", distill_token=True, seed=0)
    model.save_pretrained(tmp_path)
    back = VisionTransformer.from_pretrained(tmp_path)
    assert back.cfg.distill_token and back.head_dist is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))


@needs_timm
def test_timm_distilled_deit_converts_both_ways():
    from vitlab.bench import timm_twin
    from vitlab.convert.timm import from_timm, timm_config_from_state_dict

    ours = create_model("tutorial", distill_token=True, seed=1).eval()
    theirs = timm_twin(ours).eval()
    back = from_timm(theirs)
    assert back.cfg.distill_token and back.num_prefix_tokens == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-5)
    cfg = timm_config_from_state_dict(theirs.state_dict(), variant="tutorial")  # a bare checkpoint
    assert cfg.distill_token and cfg.image_size == 32
