"""Run-dir lock with real processes: exactly one of two writers proceeds; a killed holder's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from vitlab.errors import VitlabError
from vitlab.train.lock import LOCK_NAME, RunLock

# A writer: waits for "go", takes the lock, says so, holds it until "release" exists (no sleeps in the logic
# under test; the polling only waits for the test's files).
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from vitlab.errors import VitlabError
    from vitlab.train.lock import RunLock
    run, sync, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    while not (sync / "go").exists():
        time.sleep(0.01)
    try:
        lock = RunLock(run, command="writer " + me).acquire()
    except VitlabError as e:
        (sync / f"{me}.refused").write_text(str(e))
        sys.exit(2)
    (sync / f"{me}.holds").write_text(str(os.getpid()))
    while not (sync / "release").exists():
        time.sleep(0.01)
    lock.release()
""")


def wait_for(predicate, procs, what):
    """Poll until predicate() (the processes must still be running or have finished by then)."""
    for _ in range(6000):  # a hang guard only: 60 s
        if predicate():
            return
        time.sleep(0.01)
    for p in procs:
        p.kill()
    pytest.fail(f"timed out waiting for {what}")


def start(run, sync, name):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(sync), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_exactly_one_proceeds(tmp_path):
    run, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    procs = [start(run, sync, n) for n in ("a", "b")]
    (sync / "go").write_text("")  # both race for the lock
    wait_for(lambda: len(list(sync.glob("*.holds"))) + len(list(sync.glob("*.refused"))) == 2, procs,
             "both writers to try the lock")
    holds, refused = list(sync.glob("*.holds")), list(sync.glob("*.refused"))
    assert len(holds) == 1 and len(refused) == 1
    msg = refused[0].read_text()
    holder_pid = holds[0].read_text()
    assert f"pid {holder_pid} on {socket.gethostname()} since " in msg and "in use by" in msg
    assert f"(writer {holds[0].stem})" in msg and "\n" not in msg
    (sync / "release").write_text("")
    codes = {p.args[-1]: p.wait(timeout=60) for p in procs}
    assert codes[holds[0].stem] == 0 and codes[refused[0].stem] == 2
    with RunLock(run) as lock:  # released cleanly: free again, and not reported as stale
        assert lock.held and lock.stale is None


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    run, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    holder = start(run, sync, "a")
    (sync / "go").write_text("")
    wait_for(lambda: (sync / "a.holds").exists(), [holder], "the holder to take the lock")
    with pytest.raises(VitlabError, match=f"pid {holder.pid} "):
        RunLock(run).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs
    holder.wait(timeout=60)
    assert (run / LOCK_NAME).read_text()  # the dead holder's details are still in the file
    with RunLock(run, command="resume") as lock:
        assert lock.stale is not None and lock.stale.pid == holder.pid and "writer a" in lock.stale.command
        assert f"pid {os.getpid()}" in (run / LOCK_NAME).read_text().replace('"pid": ', "pid ")
    assert (run / LOCK_NAME).read_text() == ""  # released: emptied, the file itself stays


def test_same_process_second_lock_is_refused_and_release_is_idempotent(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(VitlabError, match=rf"{tmp_path} is in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()
    assert not first.held
    RunLock(tmp_path).acquire().release()
