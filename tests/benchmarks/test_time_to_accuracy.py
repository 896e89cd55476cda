"""The time-to-accuracy results' MFU: every step's model FLOPs at its input size over the steps' time."""

import json

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


@pytest.fixture
def tiny_run_dir(tmp_path, tiny_cifar):
    """A finished `vitlab train` run dir: the tutorial model, one epoch on 64 random images in CIFAR-10's layout."""
    from vitlab.train import resolve_recipe, train

    data = tiny_cifar(tmp_path / "data", train=64, test=32)
    cfg = resolve_recipe("tutorial", epochs=2, batch_size=16, eval_batch_size=32, precision="fp32")
    train(cfg, out=tmp_path / "base", data=str(data), progress=False, log=lambda s: None)
    return tmp_path / "base"


def main_with(monkeypatch, argv: list[str], run_dir, peak: float = 385.0) -> list:
    """tta.main() on argv with training replaced by reading `run_dir` (each call's flags recorded) and the peak
    fixed at `peak`."""
    calls = []

    def fake_run(recipe, flags, *, run_dir: object, data, peak=None):
        calls.append((recipe, flags, peak))
        return {**tta.read_run(fake_dir, recipe=recipe, flags=flags, command=f"vitlab train {' '.join(flags)}",
                               wall_s=60.0, peak_gflops=peak or 400.0), "peak_measured": not peak}

    fake_dir = run_dir
    monkeypatch.setattr(tta, "run", fake_run)
    monkeypatch.setattr(tta, "bf16_peak", lambda known: known or peak)
    monkeypatch.setattr("sys.argv", ["cifar10_time_to_accuracy.py", *argv])
    tta.main()
    return calls


def test_a_run_dir_is_read_with_its_reference_minutes(tiny_run_dir):
    rows = tta.read_rows(tiny_run_dir / "metrics.jsonl")
    res = tta.read_run(tiny_run_dir, recipe="tutorial", flags=[], command="c", wall_s=None, peak_gflops=410.5)
    assert res["final_test_top1"] == rows[-1]["test_top1"] and res["steps"] == rows[-1]["step"] == 8
    assert res["wall_minutes"] == res["run_minutes"] == round(rows[-1]["elapsed_s"] / 60, 2)  # no process time known
    assert res["reference_minutes"] == pytest.approx(rows[-1]["elapsed_s"] / 60 * 410.5 / 821, abs=0.006)
    assert [r["epoch"] for r in res["per_epoch"]] == [1, 2] and res["params"] > 0


def test_ref_minutes_set_the_budget_from_the_peak_measured_before_the_run(monkeypatch, tmp_path, tiny_run_dir):
    results = tmp_path / "RESULTS.md"
    calls = main_with(monkeypatch, ["tutorial", "--ref-minutes", "3", "--out-dir", str(tmp_path / "out"),
                                    "--results", str(results), "--runs-dir", str(tmp_path / "runs")], tiny_run_dir)
    assert calls == [("tutorial", ["--time-budget", f"{3 * 821 / 385:.2f}"], 385.0)]  # 6.40 wall minutes
    saved = json.loads(next((tmp_path / "out").glob("cifar10_time_to_accuracy-tutorial-*.json")).read_text())
    assert saved["peak_gflops"] == 385.0 and saved["peak_measured"] is True
    assert "--time-budget 6.40" in results.read_text()


def test_an_ablation_can_take_its_base_from_an_earlier_run(monkeypatch, tmp_path, tiny_run_dir):
    """--base-run: the base is read from the run dir (e.g. the vitlab run of --peers), only the levers train."""
    results = tmp_path / "RESULTS.md"
    calls = main_with(monkeypatch, ["--ablation", "tutorial", "--minutes", "15", "--only", "one-cycle", "--only",
                                    "wider conv stem (64, 128)", "--base-run", str(tiny_run_dir), "--base-peak", "500",
                                    "--out-dir", str(tmp_path / "out"), "--results", str(results),
                                    "--runs-dir", str(tmp_path / "runs")], tiny_run_dir)
    assert [c[1] for c in calls] == [["--time-budget", "15", "--decay", "onecycle"],
                                     ["--time-budget", "15", "--model-arg", "stem_channels=64,128"]]
    saved = json.loads(next((tmp_path / "out").glob("cifar10_ablation-tutorial-15min-*.json")).read_text())
    assert list(saved["runs"]) == ["(base)", "one-cycle", "wider conv stem (64, 128)"]
    assert saved["runs"]["(base)"]["peak_gflops"] == 500.0
    assert saved["runs"]["(base)"]["command"] == f"the run in {tiny_run_dir}"
    assert "+0.00 pt" in results.read_text()  # the same run dir stands in for every lever here
    with pytest.raises(SystemExit):  # an unknown lever is refused before anything trains
        main_with(monkeypatch, ["--ablation", "tutorial", "--only", "onecycle"], tiny_run_dir)
    with pytest.raises(SystemExit):  # --base-run needs its peak
        main_with(monkeypatch, ["--ablation", "tutorial", "--base-run", str(tiny_run_dir)], tiny_run_dir)
