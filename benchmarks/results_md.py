"""benchmarks/RESULTS.md: the one table every benchmark script appends its rows to."""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\n| benchmark | date | setting | result | details |\n"
          "| --- | --- | --- | --- | --- |\n")


def table_row(cells: list[str]) -> str:
    """One markdown table row; a '|' inside a cell would split it, so it becomes '/'."""
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def append_rows(rows: list[str], path: Path = RESULTS_MD) -> None:
    """Append finished table rows, creating the file with its header if there is none yet."""
    text = path.read_text() if path.is_file() else HEADER
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "".join(r.rstrip("\n") + "\n" for r in rows))
