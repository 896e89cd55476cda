"""Fault injection: `kill -9` a short `vitlab train` run at N random points, recover it, compare with an
uninterrupted run.

Kill points, alternating (--mode mixed, the default), or all of one kind:
  time   a moment drawn uniformly over the reference run's training phase (its "training ..." line to its
         end): mid-step, mid-evaluation, mid-write of any file;
  write  a file-system operation drawn uniformly from those the reference run makes (os.replace, os.fsync,
         os.unlink, os.mkdir, os.rmdir, shutil.rmtree: every step of atomic_write and of a checkpoint's
         commit and clean-up); the process kills itself just before it.
Recovery is what a user does: `vitlab train --resume RUN` when RUN/train_config.json exists, else the
original command again. Each kill is then: survived (recovery exits 0) or lost (it fails), and
bit-identical when the final run dir's weights (model.safetensors) and last checkpoint (model, EMA,
optimizer, RNG states) equal the uninterrupted run's bit for bit. Writes benchmarks/results/fault_injection.json and a
row in benchmarks/RESULTS.md.

    python benchmarks/fault_injection.py --n 40                       # the full run (real CIFAR-10 subset)
    python benchmarks/fault_injection.py --n 5 --epochs 2 --dry-run   # smoke: prints the row, writes nothing

Part 2 (--part 2, issue 19): the newer surfaces, each case a real process against real files. Export into a
run dir, a locked dir, a dir of someone else's files, over an earlier export with and without --force, ONNX
beside stale weights; a corrupt CIFAR archive in the cache (junk offline; truncated and member-less with a
local mirror: moved aside, fetched again); kill -9 of a streamed run (DataLoader workers orphaned) and an
immediate --resume; an unwritable RUN/tb; under torchrun: a run dir in use, a global batch that does not
split, an unknown flag, a busy --master-port, and rank 0 SIGKILLed under --max-restarts. Each case counts
as held when the exit code and the output are what vitlab promises (one line, exit 2, for a refusal); lost
runs are trained runs or user files that changed, or killed runs that did not resume; tracebacks are
counted in every process's output. Writes benchmarks/results/fault_injection_part2.json.

    python benchmarks/fault_injection.py --part 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch
from results_md import RESULTS_MD, append_rows, table_row

from vitlab.weights import load_state_dict

HERE = Path(__file__).parent

# `python -c HOOKED KILL_AT OPS_FILE vitlab-args...`: counts the file-system operations below and SIGKILLs
# itself just before number KILL_AT (0: never), after naming it in OPS_FILE.
HOOKED = textwrap.dedent("""
    import os, shutil, signal, sys
    kill_at, ops_file, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    count = 0

    def counted(name, fn):
        def op(*args, **kwargs):
            global count
            count += 1
            if count == kill_at:
                with open(ops_file, "w") as f:
                    f.write(f"{count} {name} {args[0] if args else ''}")
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return op

    for module, names in ((os, ("replace", "fsync", "unlink", "mkdir", "rmdir")), (shutil, ("rmtree",))):
        for name in names:
            setattr(module, name, counted(f"{module.__name__}.{name}", getattr(module, name)))
    from vitlab.cli import main
    code = main(argv)
    if kill_at == 0:
        with open(ops_file, "w") as f:
            f.write(str(count))
    sys.exit(code)
""")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Run:
    """One `vitlab train` process (optionally hooked), its output lines timed from its start."""

    def __init__(self, args: list[str], env: dict, *, kill_at: int | None = None, ops_file: Path | None = None):
        cmd = [sys.executable, "-m", "vitlab", *args] if kill_at is None else \
            [sys.executable, "-c", HOOKED, str(kill_at), str(ops_file), *args]
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.start, line.rstrip("\n")))

    def wait(self, timeout: float = 3600) -> tuple[int, str]:
        err = self.proc.stderr.read()
        rc = self.proc.wait(timeout=timeout)
        self.reader.join()
        return rc, err

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The run dir's published weights and every tensor of its last checkpoint."""
    latest = json.loads((run_dir / "checkpoint" / "latest.json").read_text())
    folder = run_dir / "checkpoint" / latest["dir"]
    out = {"model.safetensors": load_state_dict(run_dir / "model.safetensors")}
    for p in sorted(folder.glob("*.safetensors")):  # model, EMA, optimizer, RNG states
        out[f"checkpoint/{p.name}"] = load_state_dict(p)
    return out


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def trial(i: int, mode: str, rng: random.Random, *, base: list[str], env: dict, work: Path, reference: dict,
          train_span: tuple[float, float], write_ops: int) -> dict:
    run_dir, ops_file = work / f"kill-{i:03d}", work / f"kill-{i:03d}.op"
    args = ["train", *base, "--out", str(run_dir)]
    record: dict = {"mode": mode}
    if mode == "write":
        k = rng.randint(1, write_ops)
        r = Run(args, env, kill_at=k, ops_file=ops_file)
        rc, _ = r.wait()
        record.update(at_op=k, op=ops_file.read_text().split(" ", 2)[1] if ops_file.exists() else None)
    else:
        t = rng.uniform(*train_span)
        r = Run(args, env)
        while r.proc.poll() is None and r.seconds() < t:
            time.sleep(0.005)
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGKILL)
        rc, _ = r.wait()
        record.update(at_s=round(t, 3))
    record["killed"] = rc == -signal.SIGKILL
    resumable = (run_dir / "train_config.json").is_file()
    record["recovery"] = "resume" if resumable else "restart"
    again = Run(["train", "--resume", str(run_dir)] if resumable else args, env)
    rc, err = again.wait()
    record["recovery_rc"] = rc
    record["survived"] = rc == 0
    if rc != 0:
        record["error"] = (err.strip().splitlines() or [""])[-1][:300]
        record["traceback"] = "Traceback" in err
    record["bit_identical"] = rc == 0 and identical(final_state(run_dir), reference)
    shutil.rmtree(run_dir, ignore_errors=True)
    ops_file.unlink(missing_ok=True)
    log(f"kill {i + 1}: {mode} {record.get('op') or ''} {record.get('at_op', record.get('at_s'))} -> "
        f"{record['recovery']} rc {rc}, {'bit-identical' if record['bit_identical'] else 'DIFFERENT'}")
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="kill points")
    p.add_argument("--mode", choices=("mixed", "time", "write"), default="mixed")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--data", default=os.environ.get("VITLAB_DATA"), help="CIFAR-10 dir (default $VITLAB_DATA)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=512)
    p.add_argument("--test-subset", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "results" / "fault_injection.json")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD)
    p.add_argument("--dry-run", action="store_true", help="print the row; write no JSON and no RESULTS.md row")
    p.add_argument("--part", type=int, choices=(1, 2), default=1, help="1: kill -9 of training; 2: issue 19's cases")
    args = p.parse_args()
    if not args.data:
        p.error("give --data or set VITLAB_DATA (CIFAR-10)")
    if args.part == 2:
        from fault_injection_part2 import part2

        return part2(args)

    # Tiny but with every checkpointed part on: EMA (ema.safetensors), AdamW moments, augmentation RNG.
    base = ["--recipe", "tutorial", "--data", str(args.data), "--epochs", str(args.epochs), "--train-subset",
            str(args.train_subset), "--test-subset", str(args.test_subset), "--batch-size", str(args.batch_size),
            "--model-arg", "width=32", "--model-arg", "depth=2", "--model-arg", "heads=2", "--model-arg",
            "mlp_dim=64", "--precision", "fp32", "--ema", "0.99", "--policy", "trivial", "--no-progress"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vitlab-faults-") as tmp:
        work = Path(tmp)
        # Every process alike, so an uninterrupted and a killed-and-resumed run can match bit for bit.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
               "MPLCONFIGDIR": str(work / "mpl")}
        ref_dir, ops_file = work / "reference", work / "reference.ops"
        ref = Run(["train", *base, "--out", str(ref_dir)], env, kill_at=0, ops_file=ops_file)
        rc, err = ref.wait()
        if rc != 0:
            log(err)
            return rc
        total_s, train_s = ref.seconds(), ref.first("training ") or 0.0
        write_ops = int(ops_file.read_text())
        reference = final_state(ref_dir)
        log(f"reference: {total_s:.1f} s ({train_s:.1f} s to the first step), {write_ops} file operations")
        modes = [args.mode] * args.n if args.mode != "mixed" else [("time", "write")[i % 2] for i in range(args.n)]
        kills = [trial(i, m, rng, base=base, env=env, work=work, reference=reference,
                       train_span=(train_s, total_s), write_ops=write_ops) for i, m in enumerate(modes)]

    survived = sum(k["survived"] for k in kills)
    same = sum(k["bit_identical"] for k in kills)
    killed = sum(k["killed"] for k in kills)
    by_op: dict[str, int] = {}
    for k in kills:
        if k.get("op"):
            by_op[k["op"]] = by_op.get(k["op"], 0) + 1
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "n": args.n, "mode": args.mode,
              "seed": args.seed, "train_args": base, "reference_s": round(total_s, 2),
              "reference_train_start_s": round(train_s, 2), "write_ops": write_ops, "killed": killed,
              "survived": survived, "lost": args.n - survived, "bit_identical": same, "kills": kills}
    print(f"{args.n} kills ({killed} landed before the run ended): survived {survived}, lost {args.n - survived}, "
          f"bit-identical {same}")
    n_time, n_write = modes.count("time"), modes.count("write")
    row = table_row([
        "fault_injection", result["date"],
        f"{args.n} kill -9 ({n_time} at random times of the training phase, {n_write} before random file "
        f"operations of {write_ops}); tutorial-shaped 32w 2d, EMA, {args.epochs} epochs of {args.train_subset} "
        f"images, torch {result['torch']}",
        f"survived **{survived}/{args.n}**, lost {args.n - survived}, bit-identical **{same}/{args.n}**",
        f"{killed} kills landed before the run ended; write kills by operation: "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_op.items())) + "; results/fault_injection.json",
    ])
    print(row)
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        append_rows([row], args.results_md)
        log(f"wrote {args.out} and a row in {args.results_md}")
    return 0 if survived == args.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
