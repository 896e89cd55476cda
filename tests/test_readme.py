"""The README and docs/ pages: their Python runs and prints what it says, every `vitlab` command and flag they
show exists, their links resolve, and the README stays short."""

import ast
import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = re.compile(r"^\((\d+(?:, \d+)*)\)")  # a comment like "# (8, 10)" after an assignment


def run_checked(code: str, namespace: dict) -> int:
    """Run `code` statement by statement; check each print's output against its line's comment and each
    assignment's result shape against a "# (d0, d1, ...)" comment. Returns how many comments were checked."""
    lines = code.splitlines()
    checked = 0
    for stmt in ast.parse(code).body:
        comment = lines[stmt.end_lineno - 1].partition("  #")[2].strip()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(ast.Module([stmt], []), str(README), "exec"), namespace)
        is_print = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
            getattr(stmt.value.func, "id", None) == "print"
        if is_print and comment:
            assert out.getvalue().strip() == comment, f"README says {comment!r}, the code prints {out.getvalue()!r}"
            checked += 1
        elif isinstance(stmt, ast.Assign) and (m := SHAPE.match(comment)):
            value = namespace[stmt.targets[0].id] if isinstance(stmt.targets[0], ast.Name) else None
            expected = tuple(int(d) for d in m[1].split(", "))
            assert value is not None and tuple(value.shape) == expected, f"README says {comment!r}"
            checked += 1
    return checked


def test_readme_python_blocks_run_and_print_what_they_say(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    checked = sum(run_checked(code, namespace) for code in blocks)
    assert checked >= 2  # the shape of the logits and the printed attention shapes
    assert sorted(p.name for p in (tmp_path / "my-vit").iterdir()) == ["config.json", "model.safetensors"]
    same, model = namespace["same"], namespace["model"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), model.eval()(x), rtol=0, atol=0)


DOCS = README.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "walkthrough.md")  # walkthrough.md: its own test runs it
CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
COMMAND = re.compile(r"\bvitlab\s+([a-z][a-z-]*)(.*)")
LINK = re.compile(r"\]\(([^)\s]+)\)|^\[[^\]]+\]: (\S+)", re.M)


def test_readme_is_short_and_the_rest_is_in_docs():
    assert len(README.read_text().splitlines()) <= 150
    assert len(PAGES) >= 4
    for page in PAGES:  # the README points at every page
        assert f"(docs/{page.name})" in README.read_text(), page.name


def test_docs_python_blocks_run_and_print_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for page in PAGES:
        for lang, code in CODE_BLOCK.findall(page.read_text()):
            if lang == "python":
                checked += run_checked(code, {"__name__": page.stem})
    assert checked >= 2


def commands(text: str):
    """(subcommand, rest of the line) for each `vitlab SUB ...` in code blocks (continuation lines joined,
    comments cut) and inline code spans."""
    for _, code in CODE_BLOCK.findall(text):
        for line in code.replace("\\\n", " ").splitlines():
            if m := COMMAND.search(line.partition(" #")[0]):
                yield m[1], m[2]
    for span in re.findall(r"`([^`\n]+)`", CODE_BLOCK.sub("", text)):
        if m := COMMAND.search(span):
            yield m[1], m[2]


def test_every_command_and_flag_the_docs_show_exists():
    """A renamed or removed flag breaks this test, not a reader's copy-paste."""
    import argparse

    from vitlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen = 0
    for page in [README, *DOCS.glob("*.md")]:
        for name, rest in commands(page.read_text()):
            if name not in sub:  # "vitlab model" is prose, not a command
                continue
            flags = {s for a in sub[name]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert flag in flags, f"{page.name}: vitlab {name} has no {flag}"
                seen += 1
    assert seen > 50


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    for page in [README, *DOCS.glob("*.md")]:
        for m in LINK.finditer(page.read_text()):
            target = m[1] or m[2]
            if target.startswith(("http://", "https://", "#")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve()
            assert file.exists(), f"{page.name} links to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
                assert anchor in map(slug, headings), f"{page.name}: no heading #{anchor} in {path}"
