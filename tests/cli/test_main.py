"""`vitlab` itself (vitlab/cli/__init__.py): bad input is one line + exit 2; VITLAB_DEBUG=1 shows the traceback."""

import os
import subprocess
import sys


def vitlab(*args, **env):
    base = {k: v for k, v in os.environ.items() if k != "VITLAB_DEBUG"}
    return subprocess.run([sys.executable, "-m", "vitlab", *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def test_bad_input_is_one_line_unless_debugging(tmp_path):
    argv = ["predict", str(tmp_path / "no-run"), "x.png"]
    r = vitlab(*argv)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("vitlab predict: error:") and "no-run" in r.stderr

    r = vitlab(*argv, VITLAB_DEBUG="1")
    assert r.returncode == 1, r.stderr  # an uncaught exception, as Python reports it
    assert r.stderr.startswith("Traceback (most recent call last):") and 'vitlab/cli/__init__.py", line' in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # "SomeError: <the same message>"
    assert "Error: " in last and "no-run" in last and "vitlab predict: error:" not in r.stderr
