"""Part 2 of benchmarks/fault_injection.py (`--part 2`): issue 19's surfaces as hostile and unlucky users meet them,
each case a real `vitlab` process (or torchrun job) against real files. See fault_injection.py's docstring."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

from vitlab.train.lock import RunLock

HERE = Path(__file__).parent
ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_FILES = ("batches.meta.txt", "data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
               "data_batch_5.bin", "test_batch.bin")
RECORD = 3073  # CIFAR-10 binary: 1 label byte + 3072 pixels

# `python -c MIRRORED URL MD5 vitlab-args...`: vitlab with its CIFAR-10 download pointed at URL (a local mirror
# or a port nothing listens on: offline) and that archive's MD5
MIRRORED = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from vitlab.data import cifar
    from vitlab.cli import main
    cifar.URL = sys.argv[1]
    name = cifar.CIFAR10.archives["binary"][0]
    cifar.CIFAR10 = replace(cifar.CIFAR10, archives={**cifar.CIFAR10.archives, "binary": (name, sys.argv[2])})
    sys.exit(main(sys.argv[3:]))
""")

# a torchrun script: the vitlab CLI with rank $KILL_RANK SIGKILLed after step $KILL_STEP of the first attempt
KILLER = textwrap.dedent("""
    import os, signal, sys
    from vitlab.cli import main
    from vitlab.train.loop import Trainer
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == os.environ["KILL_RANK"]:
        real, at = Trainer.after_step, int(os.environ["KILL_STEP"])
        def after_step(self, *args):
            real(self, *args)
            if self.step == at:
                os.kill(os.getpid(), signal.SIGKILL)
        Trainer.after_step = after_step
    sys.exit(main(sys.argv[1:]))
""")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) -> its sha256: what "unchanged" means."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


class Cases:
    """Runs the cases and keeps one record per case."""

    def __init__(self, work: Path, env: dict) -> None:
        self.work, self.env, self.records = work, env, []

    def vitlab(self, *args, script: tuple = ("-m", "vitlab"), env: dict | None = None, timeout: float = 900):
        env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}  # None: unset
        return subprocess.run([sys.executable, *script, *args], capture_output=True, text=True, cwd=self.work,
                              env=env, timeout=timeout)

    def record(self, case: str, r, *, rc: int, words: str = "", one_line: bool = True, lost: bool = False,
               **extra) -> dict:
        lines = r.stderr.strip().splitlines()
        traceback = "Traceback" in r.stderr or "Traceback" in r.stdout
        held = r.returncode == rc and not traceback and not lost and words in r.stderr + r.stdout and \
            (not one_line or len(lines) == 1)
        rec = {"case": case, "rc": r.returncode, "expected_rc": rc, "held": held, "lost": lost,
               "traceback": traceback, "stderr_lines": len(lines), "last_line": (lines or [""])[-1][:300], **extra}
        self.records.append(rec)
        log(f"{'held' if held else 'FAILED'}  {case}: rc {r.returncode}, {len(lines)} stderr lines"
            f"{', LOST' if lost else ''}{', TRACEBACK' if traceback else ''}  {rec['last_line'][:160]}")
        return rec


def tiny_cifar_archive(data: Path, dest: Path, n: int = 200) -> bytes:
    """The official archive's layout with the first `n` records of each batch of the real CIFAR-10: a mirror's."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in CIFAR_FILES:
            raw = (data / name).read_bytes()
            raw = raw if name.endswith(".txt") else raw[:n * RECORD]
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    dest.write_bytes(buf.getvalue())
    return buf.getvalue()


def serve(payload: bytes) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_cases(c: Cases, src: Path) -> None:
    victim = c.work / "victim"  # a trained run: export must never write over it
    shutil.copytree(src, victim)
    before = digest(victim)
    r = c.vitlab("export", str(src), str(victim), "--to", "hf")
    c.record("export into a run dir", r, rc=2, words="run", lost=digest(victim) != before)

    locked = c.work / "locked"
    with RunLock(locked, command="fault_injection: a training holding its run dir"):  # released: emptied
        before = digest(locked)
        r = c.vitlab("export", str(src), str(locked), "--to", "hf")
        changed = digest(locked) != before
    c.record("export into a locked dir", r, rc=2, lost=changed)

    foreign = c.work / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(os.urandom(4096))
    (foreign / "notes.txt").write_text("the user's own notes")
    before = digest(foreign)
    r = c.vitlab("export", str(src), str(foreign), "--to", "hf")
    c.record("export into a dir of foreign files", r, rc=2, lost=digest(foreign) != before)
    r = c.vitlab("export", str(src), str(foreign), "--to", "hf", "--force")
    c.record("export --force into foreign files", r, rc=2, lost=digest(foreign) != before)

    again = c.work / "exported"
    r = c.vitlab("export", str(src), str(again), "--to", "hf")
    c.record("export into a new dir", r, rc=0, one_line=False)
    (again / "README.md").write_text("the user's notes beside an export")
    before = digest(again)
    r = c.vitlab("export", str(src), str(again), "--to", "hf")
    c.record("export over an earlier export, no --force", r, rc=2, lost=digest(again) != before)
    r = c.vitlab("export", str(src), str(again), "--to", "hf", "--force")
    kept = (again / "README.md").is_file() and (again / "model.safetensors").is_file()
    c.record("export --force over an earlier export", r, rc=0, one_line=False, lost=not kept)

    stale = c.work / "stale"
    stale.mkdir()
    shutil.copy(src / "model.safetensors", stale / "model.safetensors")
    before = digest(stale)
    r = c.vitlab("export", str(src), str(stale), "--to", "onnx")
    c.record("export --to onnx beside stale weights", r, rc=2, lost=digest(stale) != before)


def cache_cases(c: Cases, data: Path) -> None:
    good = tiny_cifar_archive(data, c.work / "mirror.tar.gz")
    md5 = hashlib.md5(good).hexdigest()
    httpd, url = serve(good)
    try:
        for kind, bad, online in (("junk", b"not an archive at all", False), ("truncated", good[:len(good) // 2], True),
                                  ("member-less", _memberless(), True)):
            xdg = c.work / f"xdg-{kind}"
            cache = xdg / "vitlab" / "cifar10"
            cache.mkdir(parents=True)
            (cache / ARCHIVE).write_bytes(bad)
            env = {"XDG_CACHE_HOME": str(xdg), "VITLAB_DATA": None}  # vitlab's own cache dir, no --data
            args = ["train", "--recipe", "tutorial", "--model", "test", "--epochs", "1", "--train-subset", "128",
                    "--test-subset", "64", "--precision", "fp32", "--no-progress", "--out",
                    str(c.work / f"cache-{kind}")]
            r = c.vitlab(url if online else f"http://127.0.0.1:{refused_port()}/", md5, *args,
                         script=("-c", MIRRORED), env=env)
            aside = [p for p in cache.iterdir() if p.name.startswith(f"{ARCHIVE}.corrupt-")]
            moved = len(aside) == 1 and aside[0].read_bytes() == bad
            if online:
                c.record(f"corrupt cached archive ({kind}), mirror reachable: moved aside, fetched again", r, rc=0,
                         one_line=False, lost=not moved)
            else:
                c.record(f"corrupt cached archive ({kind}), offline: one line naming it", r, rc=2,
                         words=str(cache / ARCHIVE), lost=not moved)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _memberless() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz"):
        pass
    return buf.getvalue()


def stream_cases(c: Cases, trials: int = 3) -> None:
    """kill -9 of a streamed run while its DataLoader workers run, then --resume at once."""
    import numpy as np
    from PIL import Image

    imgs, rng = c.work / "imgs", np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 8)):
        for name in ("ant", "bee"):
            (imgs / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(imgs / split / name / f"{i}.png")
    for t in range(trials):
        run = c.work / f"stream-{t}"
        args = ["train", "--recipe", "tutorial", "--dataset", "folder", "--data", str(imgs), "--out", str(run),
                "--model", "test", "--epochs", "5", "--batch-size", "8", "--precision", "fp32", "--no-progress",
                "--data-mode", "stream", "--workers", "2", "--checkpoint-every", "3"]
        proc = subprocess.Popen([sys.executable, "-m", "vitlab", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=c.work, env=c.env)
        for line in proc.stdout:  # the training phase has begun: workers are up
            if line.startswith("training "):
                break
        time.sleep(1.0 + t)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        r = c.vitlab("train", "--resume", str(run), "--no-progress")
        c.record(f"kill -9 under streaming ({len(workers)} workers orphaned), immediate --resume", r, rc=0,
                 one_line=False, lost=r.returncode != 0 or not (run / "model.safetensors").is_file(),
                 killed_with_workers=len(workers))


def tensorboard_case(c: Cases, base: list[str]) -> None:
    run = c.work / "tb-run"
    run.mkdir()
    tb = run / "tb"
    if os.geteuid() == 0:  # root writes through mode bits: a file where the folder must be
        tb.write_text("not a folder")
    else:
        tb.mkdir()
        tb.chmod(0o500)
    before = sorted(p.name for p in run.iterdir())
    r = c.vitlab("train", *base, "--out", str(run), "--tensorboard")
    c.record("--tensorboard with an unwritable RUN/tb", r, rc=2, words=str(tb),
             lost=sorted(p.name for p in run.iterdir()) != before or "b'" in r.stderr)
    if tb.is_dir():
        tb.chmod(0o700)


def torchrun_cases(c: Cases, base: list[str], src: Path) -> None:
    vt = ("-m", "vitlab", "torchrun", "--standalone")
    held = c.work / "held"
    with RunLock(held, command="fault_injection: a training holding its run dir"):
        r = c.vitlab("--nproc-per-node=2", "train", *base, "--out", str(held), script=vt)
        c.record("vitlab torchrun: run dir in use", r, rc=2, words="is in use by")
        r = c.vitlab("--standalone", "--nproc-per-node=2", "-m", "vitlab", "train", *base, "--out", str(held),
                     script=("-m", "torch.distributed.run"))
        lines = r.stderr.count("vitlab train: error:")
        c.records.append({"case": "plain torchrun: run dir in use (torchrun's own traceback is expected)",
                          "rc": r.returncode, "vitlab_lines": lines, "held": lines == 1, "lost": False,
                          "traceback": False, "torchrun_traceback": "ChildFailedError" in r.stderr})
        log(f"{'held' if lines == 1 else 'FAILED'}  plain torchrun, run dir in use: {lines} vitlab line(s), rc "
            f"{r.returncode} (torchrun's ChildFailedError traceback: {'ChildFailedError' in r.stderr})")
    r = c.vitlab("--nproc-per-node=3", "train", "--resume", str(src), script=vt)
    c.record("vitlab torchrun: a global batch that does not split over 3", r, rc=2, words="does not split")
    r = c.vitlab("--nproc-per-node=2", "train", "--no-such-flag", script=vt)
    c.record("vitlab torchrun: an unknown flag", r, rc=2, words="unrecognized arguments")
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        r = c.vitlab("torchrun", f"--master-port={port}", "--nproc-per-node=2", "train", *base, "--out",
                     str(c.work / "never"))
    c.record("vitlab torchrun: a busy --master-port", r, rc=2, words=f"--master-port {port} is in use")

    killer = c.work / "killer.py"
    killer.write_text(KILLER)
    run = c.work / "rank-killed"
    r = c.vitlab("--standalone", "--max-restarts", "1", "--nproc-per-node=2", str(killer), "train", *base,
                 "--checkpoint-every", "2", "--out", str(run), script=("-m", "torch.distributed.run"),
                 env={"KILL_RANK": "0", "KILL_STEP": "3"})
    c.record("torchrun --max-restarts 1, rank 0 SIGKILLed at step 3: restarted, resumed", r, rc=0, one_line=False,
             words="resuming", lost=not (run / "model.safetensors").is_file())


def part2(args) -> int:
    base = ["--recipe", "tutorial", "--data", str(args.data), "--epochs", "1", "--train-subset", "256",
            "--test-subset", "64", "--batch-size", "32", "--model", "test", "--precision", "fp32", "--no-progress"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitlab-faults2-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
               "MPLCONFIGDIR": str(work / "mpl"), "XDG_CACHE_HOME": str(work / "xdg")}
        c = Cases(work, env)
        src = work / "src"
        r = c.vitlab("train", *base, "--out", str(src))
        if r.returncode != 0:
            log(r.stderr)
            return r.returncode
        export_cases(c, src)
        cache_cases(c, Path(args.data))
        stream_cases(c)
        tensorboard_case(c, base)
        torchrun_cases(c, base, src)
    recs = c.records
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "part": 2,
              "train_args": base, "seconds": round(time.perf_counter() - t0, 1), "cases": len(recs),
              "held": sum(r["held"] for r in recs), "lost": sum(r["lost"] for r in recs),
              "tracebacks": sum(r["traceback"] for r in recs), "records": recs}
    print(f"{result['cases']} cases: held {result['held']}, lost runs {result['lost']}, tracebacks "
          f"{result['tracebacks']} ({result['seconds']:.0f} s)")
    if not args.dry_run:
        out = args.out.with_name("fault_injection_part2.json") if args.out.name == "fault_injection.json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    return 0 if result["held"] == result["cases"] else 1
