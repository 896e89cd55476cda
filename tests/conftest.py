import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# ---------------------------------------------------------------- CI mode: a skip fails the run
# CI promises the data (VITLAB_DATA) and the dev extras, so a skip there means lost coverage, not a partial venv.
# Tests marked `optional_env` may skip for something CI may legitimately lack (a browser apt could not install),
# but not for missing data.


def ci_mode() -> bool:
    return os.environ.get("VITLAB_CI") == "1" or os.environ.get("CI", "").lower() == "true"


_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    # optional_env excuses what CI may lack, never the data: a skip naming VITLAB_DATA always counts
    if "optional_env" not in getattr(report, "keywords", {}) or "VITLAB_DATA" in reason:
        _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):  # a module-level skip hides every test in the file
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if ci_mode() and _unexpected_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if ci_mode() and _unexpected_skips:
        terminalreporter.section("CI mode: skipped tests fail the run", red=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"SKIPPED IN CI {nodeid}: {reason}", red=True)
        terminalreporter.line("CI (VITLAB_CI=1 or CI=true) promises VITLAB_DATA and the dev extras; mark a test "
                              "optional_env only if CI may legitimately lack what it needs.")


# ---------------------------------------------------------------- data


def find_cifar() -> Path | None:
    d = os.environ.get("VITLAB_DATA")
    return Path(d) if d and (Path(d) / "test_batch.bin").is_file() else None


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 (binary layout) named by VITLAB_DATA; tests that need it skip without it."""
    d = find_cifar()
    if d is None:
        pytest.skip("real CIFAR-10 not available (set VITLAB_DATA)")
    return d


@pytest.fixture(scope="session")
def tiny_cifar():
    """Factory: tiny_cifar(root, "cifar10" | "cifar100", train=64, test=32) -> root holding random images in the
    official binary layout, labels cycling through the classes (CIFAR-10: data_batch_1..5.bin + test_batch.bin +
    batches.meta.txt with the real class names; CIFAR-100: train.bin / test.bin, a coarse then a fine label byte
    per record, fine_label_names.txt / coarse_label_names.txt)."""

    def make(root: Path, name: str = "cifar10", *, train: int = 64, test: int = 32, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        classes = 10 if name == "cifar10" else 100

        def records(n: int) -> bytes:
            labels = [np.arange(n) % classes]  # every class present, in order
            if name == "cifar100":
                labels.insert(0, labels[0] // 5)  # coarse label byte first
            pixels = rng.integers(0, 256, (n, 3 * 32 * 32))
            return np.concatenate([np.stack(labels, 1), pixels], 1).astype(np.uint8).tobytes()

        root.mkdir(parents=True, exist_ok=True)
        if name == "cifar10":
            for i, part in enumerate(np.array_split(np.arange(train), 5), start=1):
                (root / f"data_batch_{i}.bin").write_bytes(records(len(part)))
            (root / "test_batch.bin").write_bytes(records(test))
            from vitlab.data import CIFAR10_CLASSES

            (root / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")
        else:
            (root / "train.bin").write_bytes(records(train))
            (root / "test.bin").write_bytes(records(test))
            (root / "fine_label_names.txt").write_text("\n".join(f"fine_{i}" for i in range(100)) + "\n")
            (root / "coarse_label_names.txt").write_text("\n".join(f"coarse_{i}" for i in range(20)) + "\n")
        return root

    return make


# ---------------------------------------------------------------- data-parallel runs


def _assert_same_training(a: dict, b: dict, *, atol: float = 1e-5) -> None:
    """Two state dicts trained on the same global batches (e.g. 1 vs 2 processes) agree within float32 reduction
    error. The key third of a fused qkv bias is left out: its gradient is 0 in exact arithmetic (softmax ignores a
    constant added to all of a query's scores), so AdamW turns its rounding noise into full-size steps."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("qkv.bias"):
            q, _, v = x.chunk(3)
            q2, _, v2 = y.chunk(3)
            x, y = torch.cat([q, v]), torch.cat([q2, v2])
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="session")
def assert_same_training():
    return _assert_same_training


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from vitlab.train.lock import RunLock
run, sync = Path(sys.argv[1]), Path(sys.argv[2])
with RunLock(run, command="vitlab train"):
    (sync / "holds").write_text("1")
    while not (sync / "release").exists():
        time.sleep(0.01)
"""


@pytest.fixture
def held_run_lock(tmp_path):
    """held_run_lock(run_dir): a context in which another, live process holds the run dir's lock; yields its pid."""
    import contextlib
    import subprocess
    import sys
    import time

    @contextlib.contextmanager
    def hold(run: Path):
        sync = Path(tempfile.mkdtemp(dir=tmp_path))
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(run), str(sync)])
        try:
            for _ in range(3000):  # a hang guard only: 30 s
                if (sync / "holds").exists() or proc.poll() is not None:
                    break
                time.sleep(0.01)
            assert (sync / "holds").exists(), "the lock holder did not start"
            yield proc.pid
        finally:
            (sync / "release").write_text("1")
            proc.wait(timeout=30)

    return hold
