"""What a run logs: per-epoch `metrics.jsonl` + `metrics.csv`, the per-step loss in `steps.jsonl`, and
`curves.png` (drawn by `vitlab.inspect.plots`, when matplotlib is installed)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from vitlab.weights import atomic_write

METRICS = "metrics"  # metrics.jsonl, metrics.csv: one row per evaluation (epoch end)
STEPS = "steps"  # steps.jsonl: the training loss every `log_every` steps
CURVES_PNG = "curves.png"
COLUMNS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
           "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "elapsed_s")


class MetricsLog:
    """Rows of metrics, rewritten in full (atomically) at each epoch end: `<stem>.jsonl`, and `<stem>.csv`
    with `columns` when given.

    Rewriting rather than appending keeps the files consistent with the checkpoint on resume: rows after
    the last checkpoint's step (a crash between logging and checkpointing) are dropped by `truncate`.
    """

    def __init__(self, run_dir: str | Path, stem: str = METRICS, columns: tuple[str, ...] | None = COLUMNS) -> None:
        self.run_dir = Path(run_dir)
        self.stem, self.columns = stem, columns
        self.rows: list[dict] = []

    @property
    def path(self) -> Path:
        return self.run_dir / f"{self.stem}.jsonl"

    def load(self) -> list[dict]:
        if self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return self.rows

    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def write(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines))
        if self.columns is None:
            return
        cols = [c for c in self.columns if any(r.get(c) is not None for r in self.rows)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: _fmt(r.get(c)) for c in cols} for r in self.rows)
        atomic_write(self.run_dir / f"{self.stem}.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def figures():
    """`vitlab.inspect.plots`, or None when matplotlib (the optional "plot" extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from vitlab.inspect import plots  # outside the try: a bug in plots must not read as "no matplotlib"

    return plots
