"""The time-to-accuracy results' MFU: every step's model FLOPs at its input size over the steps' time."""

import cifar10_time_to_accuracy as tta
import pytest
import torch

from vitlab.bench import run_mfu
from vitlab.model import flops_per_image, parse_variant


def test_run_mfu_counts_each_step_at_its_size_over_the_epochs_time():
    cfg = parse_variant("tutorial")
    rows = [{"step": 4, "images_per_sec": 100.0}, {"step": 8, "images_per_sec": 50.0}]
    small, full = (flops_per_image(cfg, image_size=s, training=True) for s in (16, 32))
    assert small < full / 3  # a quarter of the tokens: the 16 px steps must not count as full ones
    seconds = 4 * 16 / 100 + 4 * 16 / 50
    expected = 16 * (4 * small + 4 * full) / seconds / 200e9
    record = {"model": {"config": cfg.to_dict()}, "config": {"resize_schedule": "16:0.5"},
              "plan": {"global_batch_size": 16}}
    assert tta.mfu_of(record, rows, 200.0) == pytest.approx(expected, rel=1e-12)
    # without progressive resizing every step is a full one; an epoch without steps adds nothing
    record["config"]["resize_schedule"] = ""
    rows.append({"step": 8, "images_per_sec": None})
    assert run_mfu(cfg, rows, batch_size=16, peak_gflops=200.0) == pytest.approx(16 * 8 * full / seconds / 200e9)
    assert tta.mfu_of(record, rows, 200.0) == pytest.approx(16 * 8 * full / seconds / 200e9)


def test_the_peak_is_measured_in_bf16_unless_given(monkeypatch):
    calls = []
    monkeypatch.setattr(tta, "matmul_peak", lambda dtype: calls.append(dtype) or 123.0)
    assert tta.bf16_peak(385.0) == 385.0 and calls == []  # --peak: reused, not measured
    assert tta.bf16_peak(None) == 123.0 and calls == [torch.bfloat16]


def test_a_swin_run_is_read_as_a_swin():
    """train_config.json's model_type picks the config class: the MFU counts the Swin's FLOPs, the row says Swin,
    and --peers (timm's ViT of the recipe's width and depth) refuses a Swin recipe before running anything."""
    from vitlab.model import model_config

    cfg = model_config("swin-test", num_classes=10)
    rows = [{"step": 4, "images_per_sec": 100.0}]
    record = {"model": {"model_type": "vitlab_swin", "config": cfg.to_dict()}, "config": {"resize_schedule": ""},
              "plan": {"global_batch_size": 16}}
    assert tta.recorded_config(record) == cfg
    expected = 16 * 4 * flops_per_image(cfg, training=True) / (4 * 16 / 100) / 200e9
    assert tta.mfu_of(record, rows, 200.0) == pytest.approx(expected, rel=1e-12)
    assert tta.model_kind({"model_type": "vitlab_swin", "model_config": cfg.to_dict()}) == "Swin"
    assert tta.model_kind({"model_config": {"stem": "conv"}}) == "conv stem"  # older results: no model_type
    with pytest.raises(SystemExit, match="swin-sprint trains swin-cifar, which has no such twin"):
        tta.run_peers("swin-sprint", None, [], {}, "now")
