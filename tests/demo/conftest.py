"""A CIFAR-10-shaped run directory for the demo: seeded weights, class names, the run's preprocessing."""

from __future__ import annotations

import pytest

from vitlab.data import CIFAR10_CLASSES
from vitlab.model import create_model
from vitlab.rundir import write_preprocessor_config

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture
def demo_run(tmp_path):
    """demo_run(**config) -> a run-like dir (CIFAR-10 classes, 32 px, 4 px patches unless overridden)."""

    def make(**overrides):
        model = create_model("tutorial", seed=0, **{"depth": 2, **overrides})
        d = tmp_path / "run"
        model.save_pretrained(d, class_names=list(CIFAR10_CLASSES) if model.cfg.num_classes == 10 else None)
        write_preprocessor_config(d, image_size=model.cfg.image_size, mean=CIFAR_MEAN, std=CIFAR_STD)
        return d

    return make
