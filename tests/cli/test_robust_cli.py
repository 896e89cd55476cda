"""`vitlab train` under faults, with real processes: SIGTERM, a second writer, a killed holder's stale lock (its forked
workers never keep it), a full disk, a diverging run, corrupted run files on resume, empty or wrong paths. Tiny
runs on random images.

A run is paused at a chosen point by a wrapper (PAUSING) that waits for a file, so the test signals, kills or
fills the disk at a known moment with no sleeps in the logic under test.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.train.lock import RunLock
from vitlab.weights import load_state_dict

TINY = ["--recipe", "tutorial", "--epochs", "3", "--train-subset", "64", "--test-subset", "32", "--batch-size", "16",
        "--model", "test", "--precision", "fp32", "--no-progress", "--ema", "0.9"]
STEPS_PER_EPOCH = 4

# `python -c PAUSING SYNC_DIR WHEN vitlab-args...`: runs `vitlab ...`, and at WHEN ("step:N": before the
# training step that follows step N; "epoch:N": after epoch N's checkpoint) writes SYNC_DIR/paused and waits
# for SYNC_DIR/go.
PAUSING = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from vitlab.cli import main
    from vitlab.train import loop
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (a background job)
    sync, when, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    kind, n = when.split(":")
    n = int(n)

    def pause():
        (sync / "paused").write_text(str(os.getpid()))
        while not (sync / "go").exists():
            time.sleep(0.01)

    if kind == "epoch":
        real_end = loop.Trainer.end_epoch
        def end_epoch(self, **kw):
            real_end(self, **kw)
            if self.epoch == n:
                pause()
        loop.Trainer.end_epoch = end_epoch
    else:
        real_step = loop.Trainer.train_step
        def train_step(self, batch):
            if self.step == n:
                pause()
            return real_step(self, batch)
        loop.Trainer.train_step = train_step
    sys.exit(main(argv))
""")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # every process alike: bit-identical runs


def vitlab(*args):
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, env=ENV)


def start_paused(sync, when, *args):
    sync.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", PAUSING, str(sync), when, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for _ in range(12000):  # a hang guard only: 120 s
        if (sync / "paused").exists():
            return proc
        if proc.poll() is not None:
            pytest.fail(f"exited before pausing: {proc.communicate()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("never paused")


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def same_weights(a, b):
    wa, wb = load_state_dict(a / "model.safetensors"), load_state_dict(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("robust") / "cifar10")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted run: what every interrupted and resumed one must end at, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = vitlab("train", "--data", str(data), "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("sig, code, what", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_cleanly_and_the_run_resumes_bit_exactly(tmp_path, data, reference, sig, code, what):
    run = tmp_path / "run"
    proc = start_paused(tmp_path / "sync", f"step:{STEPS_PER_EPOCH + 2}", "train", "--data", str(data),
                        "--out", str(run), *TINY)  # mid-epoch 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert one_line(err) == f"vitlab: {what}"
    assert f"{what}; continue with: vitlab train --resume {run}" in out
    assert not any(p.name.startswith(".") and p.name != ".vitlab-lock" for p in run.iterdir())  # no debris
    if sig == signal.SIGINT:
        return  # the same path from here on
    r = vitlab("train", "--resume", str(run))
    assert r.returncode == 0 and f"resuming {run} at epoch 2, step 4/12" in r.stdout, r.stderr
    assert same_weights(run, reference)


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, data, reference):
    run = tmp_path / "run"
    holder = start_paused(tmp_path / "sync", "epoch:1", "train", "--data", str(data), "--out", str(run), *TINY)
    try:
        second = vitlab("train", "--resume", str(run))
        line = one_line(second.stderr)
        assert second.returncode == 2 and f"{run} is in use by pid {holder.pid} on " in line, line
        assert f"since {time.strftime('%Y-%m-%d')}" in line and f"(vitlab train --out {run})" in line
        again = vitlab("train", "--data", str(data), "--out", str(run), *TINY)  # a new run on the same --out
        assert again.returncode == 2 and "already holds a run" in one_line(again.stderr)
    finally:
        holder.kill()  # kill -9: the lock file keeps the dead holder's details
        holder.communicate()
    # what a process killed mid-save leaves: a budget probe's scratch folder, a temp file, a half checkpoint
    (run / ".budget-probe-k1ll3d").mkdir()
    (run / ".budget-probe-k1ll3d" / "model.safetensors").write_bytes(b"partial")
    (run / ".metrics.jsonl.abcd1234.tmp").write_text("partial")
    (run / "checkpoint" / "step-000008-abcd1234").mkdir()
    r = vitlab("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of pid {holder.pid}" in r.stdout and "removed what an interrupted run left" in r.stdout
    assert not (run / ".budget-probe-k1ll3d").exists() and not (run / ".metrics.jsonl.abcd1234.tmp").exists()
    assert [p.name for p in (run / "checkpoint").iterdir() if p.name.startswith("step-000008")] == []
    assert same_weights(run, reference)


FILL_AND_RESUME = """
set -e
mount -t tmpfs -o size=8m tmpfs {mnt}
{python} -c "$PAUSING" {sync} epoch:1 train --data {data} --out {mnt}/run {args} > {log}.out 2> {log}.err &
pid=$!
while [ ! -e {sync}/paused ]; do sleep 0.05; done
dd if=/dev/zero of={mnt}/filler bs=64k 2> /dev/null || true   # the disk is now full
touch {sync}/go
rc=0; wait $pid || rc=$?
echo $rc > {log}.rc
ls -a {mnt}/run/checkpoint > {log}.ls
rm {mnt}/filler
{python} -m vitlab train --resume {mnt}/run > {log}.resume 2>&1
cp -r {mnt}/run {copy}
"""


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(tmp_path, data, reference):
    """A real full disk (a private tmpfs, filled while the run is paused after epoch 1)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mnt, sync, log = tmp_path / "mnt", tmp_path / "sync", tmp_path / "log"
    mnt.mkdir()
    sync.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or user namespaces): {probe.stderr.strip()}")
    script = FILL_AND_RESUME.format(mnt=mnt, python=sys.executable, sync=sync, data=data, log=log,
                                    args=" ".join(TINY), copy=tmp_path / "run")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       env={**ENV, "PAUSING": PAUSING})
    assert r.returncode == 0, r.stderr
    err = (tmp_path / "log.err").read_text()
    assert (tmp_path / "log.rc").read_text().strip() == "2" and one_line(err).endswith("No space left on device")
    assert f"stopped: No space left on device; continue with: vitlab train --resume {mnt}/run" in \
        (tmp_path / "log.out").read_text()
    kept = (tmp_path / "log.ls").read_text().split()
    assert sorted(kept) == [".", "..", "latest.json", kept[-1]] and kept[-1].startswith("step-000004-"), kept
    assert "test top-1" in (tmp_path / "log.resume").read_text()
    assert same_weights(tmp_path / "run", reference)


def test_a_diverging_run_keeps_its_last_finite_checkpoint(tmp_path, data, capsys):
    """--lr 100 reached over a long warmup: the first epoch stays finite, a later one blows up."""
    run = tmp_path / "run"
    args = [a for a in TINY if a not in ("--ema", "0.9")]
    code = main(["train", "--data", str(data), "--out", str(run), *args, "--epochs", "20", "--lr", "100",
                 "--warmup-epochs", "20"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "training diverged at step" in err and "is kept" in err and "lower --lr" in err
    state = json.loads(next((run / "checkpoint").glob("step-*/state.json")).read_text())
    diverged = int(err.split("diverged at step ")[1].split()[0])
    assert STEPS_PER_EPOCH <= state["step"] < diverged and f"(epoch {state['epoch']}, step {state['step']})" in err
    for path in (run / "model.safetensors", *(run / "checkpoint").glob("step-*/model.safetensors")):
        assert all(torch.isfinite(v).all() for v in load_state_dict(path).values()), path
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == state["epoch"] and all(r["train_loss"] == r["train_loss"] for r in rows)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    return out


def state_json(run):
    return next((run / "checkpoint").glob("step-*/state.json"))


@pytest.mark.parametrize("file, change, words", [
    ("state", {"schedule": {"base_lr": "x"}}, "schedule field 'base_lr' must be a number"),
    ("state", {"schedule": {"base_lr": 1e-3, "total_steps": 4, "bogus": 1}}, "unknown schedule fields ['bogus']"),
    ("state", {"schedule": {"total_steps": 4}}, "missing field 'base_lr'"),
    ("state", {"schedule": {"base_lr": -1.0, "total_steps": 4}}, "'base_lr' must be a finite number >= 0"),
    ("state", {"total_steps": 10 ** 12, "schedule": {"base_lr": 1e-3, "total_steps": 10 ** 12}},
     "is not the 4 steps the run's plan has"),
    ("state", {"guard": {"skipped": -2}}, "'guard.skipped' must be a non-negative integer"),
    ("state", {"budget": {"step_s": "fast"}}, "'budget.step_s' must be a finite number"),
    ("state", {"budget": 3}, "field 'budget' must be an object or null"),
    ("state", {"ema_updates": "many"}, "'ema_updates' must be a non-negative integer"),
    ("record", {"plan": {"total_steps": "4", "warmup_steps": 4}}, "plan: field 'total_steps' must be an integer"),
    ("record", {"plan": {"total_steps": 4, "warmup_steps": 0, "precision": 16}}, "'precision' must be a string"),
    ("record", {"data": "cifar"}, "field 'data' must be an object"),
    ("record", {"config": [1]}, "field 'config' must be an object"),
])
def test_corrupted_run_files_are_one_line_on_resume(finished, tmp_path, capsys, file, change, words):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = state_json(run) if file == "state" else run / "train_config.json"
    d = json.loads(path.read_text())
    for key, value in change.items():
        d[key] = {**d[key], **value} if key == "plan" else value
    path.write_text(json.dumps(d))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["train", "train-clip"])
def test_empty_or_wrong_paths_are_one_line(tmp_path, capsys, command):
    (tmp_path / "a-file").write_text("not a run dir")
    for argv, words in [(["--resume", ""], "--resume needs the run directory"),
                        (["--out", ""], "--out needs a directory"),
                        (["--out", str(tmp_path / "a-file")], f"--out {tmp_path / 'a-file'} is a file"),
                        (["--resume", str(tmp_path / "a-file")], "is not a directory")]:
        assert main([command, *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing created

# Takes the lock, forks a child that outlives it (as a DataLoader worker outlives a killed trainer), says both pids.
HOLDER_WITH_CHILD = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from pathlib import Path
    from vitlab.train.lock import RunLock
    run, sync = Path(sys.argv[1]), Path(sys.argv[2])
    lock = RunLock(run, command="holder").acquire()
    child = mp.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()
    (sync / "pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(600)
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    run, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_WITH_CHILD, str(run), str(sync)], env=ENV)
    for _ in range(6000):  # a hang guard only: 60 s
        if (sync / "pids").exists() and len((sync / "pids").read_text().split()) == 2:
            break
        time.sleep(0.01)
    parent, child = map(int, (sync / "pids").read_text().split())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert _alive(child)  # the orphan still runs, with the inherited descriptor closed
        with RunLock(run, command="resume") as lock:
            assert lock.held and lock.stale is not None and lock.stale.pid == parent
    finally:
        os.kill(child, signal.SIGKILL)


STREAM_TINY = [a for i, a in enumerate(TINY) if "subset" not in a and "subset" not in TINY[i - 1]]  # folder splits


def two_class_folder(root, n_train: int, n_test: int = 4) -> None:
    """root/{train,test}/{ant,bee}/*.png of random 32 px images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_a_killed_streamed_run_resumes_at_once(tmp_path, monkeypatch):
    two_class_folder(tmp_path / "imgs", 16)
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data", str(tmp_path / "imgs"), "--out", str(run), *STREAM_TINY,
            "--data-mode", "stream", "--workers", "2"]
    monkeypatch.setitem(ENV, "XDG_CACHE_HOME", str(tmp_path / "cache"))
    proc = start_paused(tmp_path / "sync", "step:1", *args)  # paused mid-epoch: its workers are running
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the streamed run should have DataLoader workers"
    proc.kill()
    proc.wait(timeout=60)
    assert any(_alive(int(w)) for w in workers)  # orphaned workers still running as the resume starts
    r = subprocess.run([sys.executable, "-m", "vitlab", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "in use by" not in r.stderr and (run / "model.safetensors").exists()



def test_an_empty_class_folder_is_refused_or_warned_never_silent(tmp_path, monkeypatch):
    two_class_folder(tmp_path / "imgs", 8)
    (tmp_path / "imgs" / "train" / "emptyclass").mkdir()
    monkeypatch.setitem(ENV, "XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["train", "--dataset", "folder", "--data", str(tmp_path / "imgs"), *STREAM_TINY, "--epochs", "1"]
    for mode in ("memory", "stream"):
        r = vitlab(*args, "--out", str(tmp_path / f"refused-{mode}"), "--data-mode", mode)
        assert r.returncode == 2 and str(tmp_path / "imgs" / "train" / "emptyclass") in one_line(r.stderr)
        assert "--allow-empty-classes" in r.stderr
    r = vitlab(*args, "--out", str(tmp_path / "kept"), "--allow-empty-classes")
    assert r.returncode == 0, r.stderr
    assert "emptyclass" in r.stderr and "Traceback" not in r.stderr  # warned, naming it
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["ant", "bee", "emptyclass"]


def unwritable_tb(run) -> str:
    """RUN/tb that this process cannot write in, and the words the refusal gives: mode 0o500 as a user; as root,
    who writes through any mode bits, a file where the folder must be."""
    tb = run / "tb"
    if os.geteuid() == 0:
        tb.write_text("not a folder")
        return "it is a file, not a folder"
    tb.mkdir()
    tb.chmod(0o500)
    return "Permission denied"


@pytest.mark.parametrize("where", ["tb", "preprocessor_config.json"])
def test_an_unwritable_run_dir_is_one_line_and_a_run_that_never_started_leaves_nothing(tmp_path, data, where):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")
    if where == "tb":
        words = f"--tensorboard: cannot write event files in {run / 'tb'}: {unwritable_tb(run)}"
    else:  # a folder where train_config.json's sibling must be written
        (run / where).mkdir()
        words = f"{run / where}: is a directory, not a file"
    before = sorted(p.name for p in run.iterdir())
    r = vitlab("train", "--data", str(data), "--out", str(run), *TINY, "--tensorboard")
    assert r.returncode == 2
    assert one_line(r.stderr) == f"vitlab train: error: {words}"  # the path as text, never b'...'
    assert sorted(p.name for p in run.iterdir()) == before  # no lock, no train_config.json: as it was


def test_the_tensorboard_writer_thread_fails_without_a_traceback(tmp_path, capfd):
    """A write failing in the event writer's thread (the disk filled, the folder went) prints nothing there; the
    training thread gets the error, with the path as text, at its next write."""
    from torch.utils.tensorboard import SummaryWriter

    from vitlab.cli import user_message
    from vitlab.train.tensorboard import _quiet_writer_threads

    _quiet_writer_threads()
    writer = SummaryWriter(str(tmp_path / "tb"), flush_secs=1)
    record_writer = writer._get_file_writer().event_writer._async_writer._writer

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device", os.fsencode(tmp_path / "tb" / "events"))

    record_writer.write = full
    with pytest.raises(OSError) as e:
        for step in range(200):  # the thread fails at its first write; a later call on this thread raises
            writer.add_scalar("loss", 1.0, step)
            time.sleep(0.01)
    assert user_message(e.value) == f"{tmp_path / 'tb' / 'events'}: No space left on device"
    assert "Traceback" not in capfd.readouterr().err
