"""Model directories to export: tiny, seeded, every parameter shifted off its init (so a swapped mapping shows)."""

from __future__ import annotations

import pytest
import torch

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.model import create_clip
from vitlab.clip.tokenizer import ByteTokenizer
from vitlab.model import create_model
from vitlab.model.config import ViTConfig
from vitlab.preprocess import clip_preprocess, siglip_preprocess
from vitlab.rundir import write_preprocessor_config

TINY = dict(width=32, depth=2, heads=2, mlp_dim=64, image_size=32, patch_size=8, num_classes=5)
NAMES = ["apple", "bee", "cat", "dog", "eel"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@torch.no_grad()
def shifted(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture
def vit_dir(tmp_path):
    """vit_dir(name="run", **config) -> a run-like dir: weights, id2label, preprocessor_config.json (CIFAR mean/std)."""

    def make(name: str = "run", **overrides):
        cfg = {**TINY, **overrides}
        model = shifted(create_model("tutorial", seed=0, **cfg))
        d = tmp_path / name
        names = NAMES[:cfg["num_classes"]] or None
        model.save_pretrained(d, class_names=names)
        write_preprocessor_config(d, image_size=cfg["image_size"], mean=CIFAR_MEAN, std=CIFAR_STD)
        return d

    return make


def tiny_clip(kind: str):
    if kind == "clip":
        vision = ViTConfig(image_size=32, patch_size=8, num_classes=0, width=32, depth=2, heads=2, mlp_dim=64,
                           class_token=True, pooling="cls", pre_norm=True, fc_norm=True, norm_eps=1e-5,
                           activation="quick_gelu")
        text = TextConfig(vocab_size=259, context_length=16, width=32, depth=2, heads=2, mlp_dim=64,
                          eos_token_id=ByteTokenizer.EOS, causal=True, pooling="eos", activation="quick_gelu")
        return create_clip(CLIPConfig(vision=vision, text=text, kind="clip", embed_dim=24), seed=0)
    vision = ViTConfig(image_size=32, patch_size=8, num_classes=0, width=32, depth=2, heads=2, mlp_dim=64,
                       class_token=False, pooling="map", activation="gelu_tanh")
    text = TextConfig(vocab_size=259, context_length=16, width=32, depth=2, heads=2, mlp_dim=64,
                      eos_token_id=ByteTokenizer.EOS, causal=False, pooling="last", activation="gelu_tanh")
    return create_clip(CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=32), seed=0)


@pytest.fixture
def clip_dir(tmp_path):
    """clip_dir(kind) -> a vitlab CLIP / SigLIP dir with the byte tokenizer and the family's preprocessing."""

    def make(kind: str = "clip", logit_scale: float | None = None):
        model = shifted(tiny_clip(kind))
        if logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(logit_scale)
        pre = clip_preprocess(32) if kind == "clip" else siglip_preprocess(32)
        d = tmp_path / kind
        model.save_pretrained(d, tokenizer=ByteTokenizer(context_length=16), preprocess=pre)
        return d

    return make
