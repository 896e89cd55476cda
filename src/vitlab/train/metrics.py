"""Per-epoch metrics: `metrics.jsonl` and `metrics.csv` in the run dir, and `curves.png` from them."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from vitlab.weights import atomic_write

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
COLUMNS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
           "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "elapsed_s")


class MetricsLog:
    """Rows of per-epoch metrics, rewritten in full (atomically) after each epoch.

    Rewriting rather than appending keeps the two files consistent with the checkpoint on resume: rows of
    epochs after the last checkpoint (a crash between logging and checkpointing) are dropped by `truncate`.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []

    def load(self) -> list[dict]:
        path = self.run_dir / METRICS_JSONL
        if path.is_file():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return self.rows

    def truncate(self, epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write(self.run_dir / METRICS_JSONL, lambda tmp: Path(tmp).write_text(lines))
        cols = [c for c in COLUMNS if any(r.get(c) is not None for r in self.rows)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: _fmt(r.get(c)) for c in cols} for r in self.rows)
        atomic_write(self.run_dir / METRICS_CSV, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib (an optional extra) is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as PNG atomically and free it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        pyplot().close(fig)
    return path


def plot_curves(rows: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """Loss, accuracy and learning-rate panels against epochs; None (and no file) without matplotlib."""
    plt = pyplot()
    if plt is None or not rows:
        return None
    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> list[float] | None:
        vals = [r.get(key) for r in rows]
        return None if all(v is None for v in vals) else [math.nan if v is None else v for v in vals]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("Loss", "cross-entropy", [("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")], 1),
        ("Accuracy", "accuracy (%)", [("train_acc", "train top-1"), ("val_top1", "val top-1"),
                                      ("test_top1", "test top-1"), ("test_top5", "test top-5")], 100),
        ("Learning rate (end of epoch)", "learning rate", [("lr", "lr")], 1),
    ]
    for ax, (name, ylabel, keys, scale) in zip(axes, panels):
        for key, label in keys:
            ys = series(key)
            if ys is not None:
                ax.plot(epochs, [y * scale for y in ys], marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
        if len(ax.lines) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
