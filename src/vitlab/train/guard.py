"""Stopping a run cleanly: a non-finite loss or gradient norm (`NonFiniteGuard`), SIGTERM (`sigterm_interrupts`),
and one writer per run dir, with what killed runs left behind removed (`claim_run_dir`).

Exit codes of `vitlab train` / `vitlab train-clip`: 0 done; 2 bad input, a full disk, a run dir in use, or a
diverged run (`DivergedError`, one line); 130 Ctrl-C (SIGINT), 143 SIGTERM (what SLURM and Kubernetes send
before they kill). After 130 or 143 the run continues with `--resume RUN_DIR` from its last checkpoint.
"""

from __future__ import annotations

import enum
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vitlab.errors import VitlabError, check_count
from vitlab.train.checkpoint import STATE, clean_stale, committed_folder
from vitlab.train.lock import RunLock
from vitlab.train.recipes import ON_NONFINITE
from vitlab.weights import check_finite, read_json

MAX_SKIPS = 5  # skipped steps in a row after which skip mode stops: the run diverges, it does not spike
LR_FACTOR = 0.5  # skip mode: the learning rate after each skipped step, relative to before


class DivergedError(VitlabError):
    """The loss or the gradient norm became NaN/Inf: the run stopped, its last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt: the same clean, resumable stop."""

    signal_name = "SIGTERM"
    exit_code = 128 + signal.SIGTERM  # 143, the shell's code for a process ended by SIGTERM


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """The CLI's exit code for an interrupt: 143 for SIGTERM, 130 for Ctrl-C."""
    return getattr(e, "exit_code", 128 + signal.SIGINT)


def describe_stop(e: BaseException) -> str:
    """What stopped a run, for the line that names the resume command."""
    if isinstance(e, Terminated):
        return str(e)
    if isinstance(e, OSError):
        return f"stopped: {e.strerror or e}"
    return "interrupted"


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises `Terminated` (a KeyboardInterrupt), so it stops a run as Ctrl-C does.

    Checkpoints are all-or-nothing, so an exception at any point leaves the last one whole. Only the main
    thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated ({Terminated.signal_name})")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stops_on_sigterm(fn: Callable) -> Callable:
    """Decorator: `fn` runs inside `sigterm_interrupts()` (the training commands' `run`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sigterm_interrupts():
            return fn(*args, **kwargs)
    return wrapper


# ---- one writer per run dir -----------------------------------------------------------------------------
@contextmanager
def claim_run_dir(run_dir: str | Path, *, command: str, log: Callable[[str], None]) -> Iterator[RunLock]:
    """Hold the run dir's lock for the block (a second writer gets a VitlabError naming the holder); say so
    when a dead holder's lock is taken over; then remove what killed runs left behind (temp files, unfinished
    checkpoint folders, budget-probe scratch folders)."""
    with RunLock(run_dir, command=command) as lock:
        if lock.stale is not None:
            log(f"{run_dir}: took over the lock of {lock.stale.describe()}, which ended without releasing it")
        removed = clean_stale(run_dir)
        if removed:
            names = ", ".join(str(p.relative_to(run_dir)) for p in removed[:3])
            more = f" and {len(removed) - 3} more" if len(removed) > 3 else ""
            log(f"{run_dir}: removed what an interrupted run left behind: {names}{more}")
        yield lock


# ---- non-finite loss or gradient norm -------------------------------------------------------------------
class Decision(enum.Enum):
    """What the loop does after the guard read a step (the guard itself never edits the run)."""

    CONTINUE = "continue"  # finite, or not read yet
    SKIP = "skip"  # skip mode: the update was skipped; lower the learning rate by LR_FACTOR
    STOP = "stop"  # diverged: stop the run with DivergedError(guard.reason)


class NonFiniteGuard:
    """Watches every step's loss and global gradient norm (`TrainStep.grad_norm`, the norm it clips with).

    "stop" (default): the first non-finite value stops the run (Decision.STOP, `reason` says where and what to
    change). The values of the steps since the last check are read in one go: every step on a CPU (nothing is
    queued there, so it costs nothing) and every `log_every` steps on an accelerator (the loss is read then
    anyway), and always before an evaluation + save, where the weights themselves are checked too. The run dir
    keeps its last good checkpoint: NaN weights are never written.
    "skip": `TrainStep` checks loss and norm before each update (one host sync per step) and skips the update
    when either is non-finite; the guard answers Decision.SKIP (the loop lowers the learning rate by LR_FACTOR
    for the rest of the run: the schedule's peak and floor, saved with the checkpoint) and STOP after MAX_SKIPS
    skipped steps in a row. A skipped step counts in the epoch's train loss with the last taken step's loss
    (`counted`).
    """

    def __init__(self, mode: str = "stop", *, every: int = 1, run_dir: str | Path = ".", lr: float = 0.0,
                 grad_clip: float = 0.0) -> None:
        if mode not in ON_NONFINITE:
            raise VitlabError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, not {mode!r}")
        self.mode, self.every = mode, max(1, every)
        self.run_dir, self.lr, self.grad_clip = Path(run_dir), lr, grad_clip  # for the message that stops a run
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss, norm) unread
        self.skipped, self.in_a_row = 0, 0  # skip mode: steps skipped in all, and since the last taken one
        self.last_loss: torch.Tensor | None = None
        self.reason = ""  # why the last STOP

    def observe(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None, *,
                skipped: bool = False) -> Decision:
        """After optimizer step `step` (`skipped`: TrainStep skipped its update, skip mode only)."""
        if self.mode == "skip":
            if not skipped:
                self.in_a_row, self.last_loss = 0, loss
                return Decision.CONTINUE
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= MAX_SKIPS:
                return self.stop(step, f"{self.in_a_row} steps in a row were skipped, the last at "
                                       f"{values_text(loss, norm)}", skipped=True)
            self.reason = f"step {step}: {values_text(loss, norm)}: update skipped ({self.skipped} skipped so far)"
            return Decision.SKIP
        self.pending.append((step, loss, norm))
        return self.check(step) if len(self.pending) >= self.every else Decision.CONTINUE

    def counted(self, loss: torch.Tensor, decision: Decision) -> torch.Tensor:
        """The loss the epoch's mean counts for a step: a skipped step's is the last taken one's."""
        if decision is not Decision.SKIP:
            return loss
        return self.last_loss if self.last_loss is not None else torch.zeros_like(loss)

    def check(self, step: int, *, model: torch.nn.Module | None = None) -> Decision:
        """Read the steps not read yet: STOP at the first non-finite loss or gradient norm, or (given `model`,
        before an evaluation + save) at non-finite weights."""
        pending, self.pending = self.pending, []
        if pending:
            values = torch.stack([loss.float() + (norm.float() if norm is not None else 0.0)
                                  for _, loss, norm in pending])
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                at, loss, norm = pending[int(bad[0])]
                return self.stop(at, f"non-finite values: {values_text(loss, norm)}")
        if model is not None:
            try:
                check_finite(model.state_dict(), "weights")
            except VitlabError as e:
                return self.stop(step, str(e))
        return Decision.CONTINUE

    def stop(self, step: int, what: str, *, skipped: bool = False) -> Decision:
        """STOP, with the one line that says where the run diverged, which checkpoint it keeps, what to change."""
        fixes = [f"a lower --lr (this one peaked at {self.lr:g})", "a longer --warmup-epochs",
                 *(["--grad-clip 1"] if not self.grad_clip else []), *(["--on-nonfinite skip"] if not skipped else [])]
        self.reason = (f"{self.run_dir}: training diverged at step {step} ({what}); {last_good(self.run_dir)}. "
                       f"Start a new run (another --out) with {', '.join(fixes[:-1])} or {fixes[-1]}")
        return Decision.STOP

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict, *, source: str = "checkpoint") -> None:
        if not isinstance(state, dict):
            raise VitlabError(f"{source}: field 'guard' must be an object, got {state!r}")
        self.skipped = check_count(state.get("skipped", 0), "guard.skipped", source)
        self.in_a_row = check_count(state.get("in_a_row", 0), "guard.in_a_row", source)


def values_text(loss: torch.Tensor, norm: torch.Tensor | None) -> str:
    return f"loss {float(loss):.4g}" + (f", gradient norm {float(norm):.4g}" if norm is not None else "")


def last_good(run_dir: Path) -> str:
    try:
        state = read_json(committed_folder(run_dir)[0] / STATE)
        return f"its last good checkpoint (epoch {state['epoch']}, step {state['step']}) is kept"
    except VitlabError:
        return "no checkpoint had been written yet"
