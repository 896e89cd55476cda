"""report.html embeds every figure and reaches nothing outside the file."""

import base64
import re

import numpy as np
from PIL import Image

from vitlab.inspect.report import Section, render_report, write_report

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def assert_self_contained(page: str) -> None:
    """No http(s) links, scripts, stylesheets, fonts or images from outside data URIs."""
    body = DATA_URI.sub('src="data:"', page)
    assert "http" not in body.lower()
    assert "<script" not in body.lower() and "<link" not in body.lower()
    assert "@import" not in body and "url(" not in body
    for src in re.findall(r'src="([^"]*)"', body):
        assert src == "data:"


def test_report_embeds_every_figure(tmp_path):
    pngs = []
    for i in range(3):
        p = tmp_path / f"fig{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(p)
        pngs.append(p)
    path = write_report(tmp_path / "report.html", title="run <1>", summary=[("model", "seed & co")],
                        sections=[Section(f"figure {i}", "a <b>caption</b>", p) for i, p in enumerate(pngs)],
                        notes=["something skipped"])
    page = path.read_text()
    embedded = [base64.b64decode(b) for b in DATA_URI.findall(page)]
    assert embedded == [p.read_bytes() for p in pngs]
    assert_self_contained(page)
    assert "run &lt;1&gt;" in page and "seed &amp; co" in page and "&lt;b&gt;caption" in page  # escaped
    assert "something skipped" in page


def test_render_without_sections_is_valid_html():
    page = render_report(title="t", summary=[], sections=[], notes=[])
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
