"""Shared helpers for the conversion tests."""

from __future__ import annotations

import pytest
import torch


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so LayerNorm 1/0 inits or zero biases cannot hide a swapped mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture
def perturb():
    """perturb(module, seed=0) -> the module in eval mode, every parameter shifted by N(0, 0.1^2) noise."""
    return _perturb
