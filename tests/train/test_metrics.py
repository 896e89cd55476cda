"""metrics.jsonl / metrics.csv / steps.jsonl round trips, and the training figures (curves, confusion matrix)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.train.metrics import COLUMNS, STEPS, MetricsLog, figures

ROWS = [{"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "train_acc": None, "test_loss": 2.1 / e,
         "test_top1": 0.2 * e, "test_top5": 0.5 + 0.1 * e, "lr": 1e-3 / e, "images_per_sec": 800.0 + e,
         "elapsed_s": 30.0 * e, "extra": "kept in jsonl"} for e in (1, 2, 3)]


def test_metrics_log_round_trip_and_truncate(tmp_path):
    log = MetricsLog(tmp_path)
    for r in ROWS:
        log.append(r)
    log.write()
    back = MetricsLog(tmp_path)
    assert back.load() == ROWS  # jsonl keeps every key and value exactly
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [c for c in COLUMNS if c != "train_acc" and c not in ("val_loss", "val_top1", "val_top5")]
    assert [float(t["test_top1"]) for t in table] == pytest.approx([0.2, 0.4, 0.6])
    back.truncate(step=20)  # a checkpoint at step 20: the row logged after it goes
    assert [r["epoch"] for r in back.rows] == [1, 2]


def test_steps_log_has_no_csv(tmp_path):
    log = MetricsLog(tmp_path, STEPS, columns=None)
    log.append({"step": 1, "loss": 2.3})
    log.write()
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.3}]
    assert not (tmp_path / "steps.csv").exists()


def drawn(path, fig, plots):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == plots.figure_pixels(fig)
        pixels = np.asarray(im.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0))


def test_curves_and_confusion_figures(tmp_path):
    plots = figures()
    if plots is None:
        pytest.skip("matplotlib is not installed")
    fig = plots.plot_curves(ROWS, title="run: tutorial")
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy", "Learning rate (end of epoch)"]
    loss_ax, acc_ax, _ = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train", "test"]  # no val rows: no val line
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), [20, 40, 60])  # test top-1 in percent
    assert drawn(plots.save_figure(fig, tmp_path / "curves.png"), fig, plots) > 50

    confusion = torch.tensor([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    fig = plots.plot_confusion(confusion, ["cat", "dog", "ship"], title="confusion")
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image[0], [0.8, 0.2, 0.0])  # rows normalised by the true class count
    np.testing.assert_allclose(image[2], [0, 0, 0])  # a class without samples stays empty, not NaN
    assert drawn(plots.save_figure(fig, tmp_path / "confusion.png"), fig, plots) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png"]  # no temp files left
