"""One writer per run dir: an OS lock on `RUN_DIR/.vitlab-lock`, with who holds it written inside.

    with RunLock(run_dir) as lock:   # VitlabError at once if another live process holds it
        if lock.stale:                # the previous holder died without releasing (kill -9, power loss)
            print(f"took over the lock of {lock.stale.describe()}")
        ...                           # train, save checkpoints, clean up

`fcntl.flock` is released by the kernel when its holder dies, however it dies, so a stale lock needs no
guessing from pids or ages: the next process simply gets it, and finds the dead holder's details still in
the file (a clean release empties it). The file itself is never deleted: deleting a lock file lets two
processes lock two different files. A forked child (a DataLoader worker) closes its inherited copy of the
descriptor at once, so the lock belongs to the trainer alone: a killed trainer's orphaned workers never keep it.
flock works between processes on one machine and on most network
file systems' local clients; it does not exclude a process on another host writing the same NFS share.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from vitlab.errors import VitlabError
from vitlab.rundir import LOCK_NAME

_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()  # this process's held locks, dropped by forked children


@dataclass
class Holder:
    """Who holds (or held) a run dir's lock."""

    pid: int
    host: str
    since: float  # time.time() when taken
    command: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when}" + (f" ({self.command})" if self.command else "")

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), since=float(d["since"]),
                       command=str(d.get("command", "")))
        except (ValueError, TypeError, KeyError):
            return None


class RunLock:
    """Exclusive, non-blocking lock of a run dir for the time of a `with` block (or acquire/release)."""

    def __init__(self, run_dir: str | os.PathLike, *, command: str = "") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command
        self.stale: Holder | None = None  # the dead holder whose lock was taken over, if any
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(_read(fd))
            os.close(fd)
            who = holder.describe() if holder else "another process (it has not written its details yet)"
            raise VitlabError(f"{self.path.parent} is in use by {who}; wait for it to finish or use another "
                              "--out") from None
        except BaseException:
            os.close(fd)
            raise
        self.stale = Holder.parse(_read(fd))  # details left by a holder that died without releasing
        me = Holder(pid=os.getpid(), host=socket.gethostname(), since=time.time(), command=self.command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dataclasses.asdict(me)).encode() + b"\n", 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        try:
            os.ftruncate(fd, 0)  # empty: the next holder sees a clean hand-over, not a stale lock
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class UnstartedRun:
    """Undo for a new run that fails before its first step (a read-only RUN/tb, an unwritable file): it leaves
    the run dir as it found it, lock and config files included. Made before the lock is claimed (is the dir,
    is the lock file there?); `held()` once it is held lists what is there then; `undo()`, after the lock is
    released, removes what came after, the lock file if this run made it, and the dir if this run made it.
    Nothing is removed unless the lock was held: another process's files are never touched."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.dir_existed = self.run_dir.exists()
        self.lock_existed = (self.run_dir / LOCK_NAME).exists()
        self.entries: set[str] | None = None

    def held(self) -> None:
        self.entries = set(os.listdir(self.run_dir))

    def undo(self) -> None:
        if self.entries is None or not self.run_dir.is_dir():
            return
        try:
            for name in sorted(set(os.listdir(self.run_dir)) - self.entries):
                p = self.run_dir / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if not self.lock_existed:  # released already: nobody can be holding this file
                (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
            if not self.dir_existed:
                self.run_dir.rmdir()
        except OSError:  # what cannot be removed stays; the error that stopped the run is the one to report
            pass


def _drop_in_child() -> None:
    """After fork, in the child: close (not release, not empty) the inherited descriptors; the parent keeps them."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""
