"""One self-contained HTML page: every figure embedded as a base64 data URI, inline CSS, no scripts,
no fonts, no links out, so the file opens offline and can be mailed around on its own."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from vitlab.weights import atomic_write

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 2px 12px 2px 0; text-align: left; }
th { font-weight: normal; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
p.caption { color: #444; } ul.notes { color: #8a4b00; }
"""


@dataclass(frozen=True)
class Section:
    title: str
    caption: str
    image: Path  # a PNG, embedded in the page


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def render_report(*, title: str, summary: list[tuple[str, str]], sections: list[Section],
                  notes: list[str]) -> str:
    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>", f"<table>{rows}</table>",
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    for s in sections:
        parts += [f"<h2>{esc(s.title)}</h2>", f'<p class="caption">{esc(s.caption)}</p>',
                  f'<img alt="{esc(s.title)}" src="{data_uri(s.image)}">']
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(path: str | Path, **kwargs) -> Path:
    """`render_report(**kwargs)` written atomically to `path`."""
    path = Path(path)
    text = render_report(**kwargs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
