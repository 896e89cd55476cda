"""The README's Python snippet runs as written and prints/returns what its comments say."""

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
