"""Attention maps of converted models equal the probabilities timm and transformers compute themselves."""

import pytest
import torch

from vitlab.inspect import attention_maps, attention_rollout, mean_attention_distance


def test_attention_maps_match_timm():
    timm = pytest.importorskip("timm")
    from vitlab.convert import from_timm

    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3,
        reg_tokens=2, no_embed_class=True, global_pool="map", class_token=False).eval()
    captured = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False  # timm then computes softmax(q k^T) and passes it through attn_drop
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref(x)
    ours = attention_maps(from_timm(ref), x)
    assert len(ours) == len(captured) == 2
    for a, b in zip(ours, captured):
        assert a.shape == (2, 2, 18, 18)  # 2 registers + 16 patches
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_maps_match_transformers():
    transformers = pytest.importorskip("transformers")
    from vitlab.convert import from_hf

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 attn_implementation="eager")
    ref = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        theirs = ref(pixel_values=x, output_attentions=True).attentions  # per layer (B, H, N, N)
    model = from_hf(ref)
    ours = attention_maps(model, x)
    assert len(theirs) == len(ours) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and everything downstream takes them as they are
    assert attention_rollout(ours, num_prefix_tokens=model.num_prefix_tokens).shape == (2, 17, 17)
    assert mean_attention_distance(ours, grid=4, patch_size=4, num_prefix_tokens=1).shape == (2, 2)
