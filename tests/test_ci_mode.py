"""CI mode (tests/conftest.py): under VITLAB_CI=1 or CI=true a skipped test fails the run and is named."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

TINY = '''
import pytest

def test_needs_data(cifar_dir):
    assert cifar_dir.is_dir()

def test_needs_a_tool():
    pytest.importorskip("no_such_module_vitlab")

@pytest.mark.optional_env
def test_needs_a_browser():
    pytest.skip("no browser on this machine")

@pytest.mark.optional_env
def test_needs_a_browser_and_data(cifar_dir):
    pass

@pytest.mark.xfail(strict=True, reason="known bug")
def test_known_bug():
    assert False

def test_runs():
    assert True
'''


@pytest.fixture
def run_tiny(tmp_path):
    """Run pytest in a subprocess on TINY, with this suite's conftest.py and pytest settings."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(TESTS.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_tiny.py").write_text(TINY)

    def run(*, body=None, **env):
        if body is not None:
            (tmp_path / "test_tiny.py").write_text(body)
        base = {k: v for k, v in os.environ.items() if k not in ("VITLAB_DATA", "VITLAB_CI", "CI")}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout + r.stderr

    return run


@pytest.mark.parametrize("env", [{"VITLAB_CI": "1"}, {"CI": "true"}])
def test_ci_mode_fails_on_skips_and_names_them(run_tiny, env):
    code, out = run_tiny(**env)
    assert code == 1, out
    assert "1 passed, 4 skipped, 1 xfailed" in out  # the tests themselves still pass
    named = [line for line in out.splitlines() if line.startswith("SKIPPED IN CI ")]
    assert len(named) == 3, out
    assert "test_tiny.py::test_needs_data: real CIFAR-10 not available (set VITLAB_DATA)" in named[0]
    assert "test_tiny.py::test_needs_a_tool: could not import 'no_such_module_vitlab'" in named[1]
    # optional_env excuses the missing browser, not missing data; an xfail is not a skip
    assert "test_tiny.py::test_needs_a_browser_and_data: real CIFAR-10 not available" in named[2]


def test_outside_ci_skips_pass(run_tiny):
    code, out = run_tiny()
    assert code == 0, out
    assert "1 passed, 4 skipped, 1 xfailed" in out and "SKIPPED IN CI" not in out
    assert "real CIFAR-10 not available" in out  # -ra still lists every skip with its reason


def test_ci_mode_passes_when_only_allowed_skips(run_tiny):
    allowed = TINY.replace("(cifar_dir)", "(tmp_path)").replace("cifar_dir.", "tmp_path.").replace(
        'pytest.importorskip("no_such_module_vitlab")', 'pytest.importorskip("pytest")')
    code, out = run_tiny(body=allowed, VITLAB_CI="1")
    assert code == 0, out
    assert "4 passed, 1 skipped, 1 xfailed" in out and "SKIPPED IN CI" not in out


def test_ci_mode_keeps_real_failures_and_flags_module_skips(run_tiny):
    code, out = run_tiny(body='import pytest\npytest.importorskip("no_such_module_vitlab")\n', VITLAB_CI="1")
    assert code == 1 and "SKIPPED IN CI test_tiny.py: could not import 'no_such_module_vitlab'" in out, out
    code, out = run_tiny(body="def test_fails():\n    assert False\n", VITLAB_CI="1")
    assert code == 1 and "1 failed" in out and "SKIPPED IN CI" not in out, out


def test_unknown_markers_are_errors(run_tiny):
    code, out = run_tiny(body="import pytest\n\n@pytest.mark.slowww\ndef test_x():\n    pass\n")
    assert code != 0 and "'slowww' not found in `markers`" in out, out
