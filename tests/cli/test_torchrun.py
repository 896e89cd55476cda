"""`torchrun ... -m vitlab train` (CPU, gloo, 2 processes x 1 thread) on a tiny synthetic CIFAR: it equals one process
at the same global batch; a 2-node rendezvous on localhost trains; a rank SIGKILLed mid-run under --max-restarts 1
is restarted from the mid-epoch checkpoint and ends bit-identical to the uninterrupted run (every rank's random
streams restored); a run resumes on
another number of processes at the same global batch."""

import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from helpers import free_port, torchrun
from vitlab.cli import main
from vitlab.cli.train import default_out
from vitlab.model import VisionTransformer, create_model
from vitlab.train import loop
from vitlab.weights import load_state_dict

KILLER = Path(__file__).with_name("_torchrun_kill.py")
# 128 images, global batch 16: 8 steps per epoch, 2 epochs; checkpoints every 4 steps (mid-epoch too). No crop,
# flip or dropout: a process's random draws are its own, so only then are 1 and 2 processes comparable.
TINY = ["--recipe", "tutorial", "--epochs", "2", "--precision", "fp32", "--no-progress", "--crop-padding", "0",
        "--no-flip", "--eval-batch-size", "16", "--checkpoint-every", "4", "--lr", "3e-3", "--model", "test",
        "--model-arg", "depth=2"]

# Every source of randomness on (crop, flip, TrivialAugment, mixup, dropout, drop path): each rank draws its own.
RANDOM = [a for a in TINY if a not in ("--crop-padding", "0", "--no-flip")] + [
    "--policy", "trivial", "--mixup-alpha", "0.8", "--drop-path", "0.1", "--model-arg", "dropout=0.1"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "images_per_sec")} for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("data") / "cifar", train=128, test=40)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one(work, data):
    """One process, batch 16."""
    assert main(["train", *TINY, "--data", str(data), "--batch-size", "16", "--out", str(work / "one")]) == 0
    return work / "one"


@pytest.fixture(scope="module")
def two(work, data):
    """Two processes of batch 8: (the run dir, the launch's output)."""
    done = torchrun(work, "train", *TINY, "--data", str(data), "--batch-size", "8", "--out", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "two", done


def test_two_processes_equal_one_at_the_same_global_batch(one, two, assert_same_training):
    run, done = two
    a, b = load_state_dict(one / "model.safetensors"), load_state_dict(run / "model.safetensors")
    assert_same_training(a, b)
    init = create_model(VisionTransformer.from_pretrained(run).cfg, seed=0).state_dict()  # as the run started
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-2  # far beyond the tolerance: not trivial
    for r1, r2 in zip(rows(one), rows(run)):
        assert r1.keys() == r2.keys() and r1["test_top1"] == r2["test_top1"] and r1["step"] == r2["step"]
        for k in ("train_loss", "test_loss"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5)
    record = json.loads((run / "train_config.json").read_text())
    assert record["launch"]["world_size"] == 2 and record["launch"]["backend"] == "gloo"
    assert record["plan"]["global_batch_size"] == 16 and record["plan"]["batch_size"] == 8
    assert "steps of 16 (2 processes x 8, gloo)" in done.stderr + done.stdout
    assert done.stdout.count("test top-1") == 1  # rank 1 prints nothing
    assert sorted(p.name for p in run.parent.iterdir()) == ["one", "two"]  # and writes no run dir of its own


def test_a_killed_rank_is_restarted_from_the_checkpoint(work, data):
    done = torchrun(work, "train", *RANDOM, "--data", str(data), "--batch-size", "8", "--out", "whole")
    assert done.returncode == 0, done.stderr[-3000:]
    run = work / "whole"
    done = torchrun(work, "train", *RANDOM, "--data", str(data), "--batch-size", "8", "--out", "killed",
                    launcher=("--standalone", "--max-restarts", "1"), script=(str(KILLER),),
                    env={"KILL_RANK": "0", "KILL_STEP": "14"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr and "resuming killed at epoch 2, step 12/16" in done.stderr + done.stdout
    # the surviving rank says in at most one line that its peer is gone (SIGTERM may stop it first): no tracebacks
    assert "Traceback" not in done.stderr and done.stderr.count("another process of this job is gone") <= 1
    a, b = load_state_dict(run / "model.safetensors"), load_state_dict(work / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical
    for r1, r2 in zip(rows(run), rows(work / "killed"), strict=True):  # the resumed epoch's training loss too
        assert r2.pop("train_loss") == pytest.approx(r1.pop("train_loss"), rel=1e-6)  # summed in another order
        assert r1 == r2


def test_two_node_rendezvous_on_localhost(two, work, data, assert_same_training):
    port, rdzv = free_port(), ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-id", "vitlab-test"]
    nodes = [torchrun(work, "train", *TINY, "--data", str(data), "--batch-size", "8", "--out", "nodes", nproc=1,
                      launcher=(*rdzv, "--rdzv-endpoint", f"127.0.0.1:{port}"), wait=False) for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    record = json.loads((work / "nodes" / "train_config.json").read_text())
    assert record["launch"]["world_size"] == 2 and record["launch"]["run_id"] == "vitlab-test"
    assert_same_training(load_state_dict(two[0] / "model.safetensors"),
                         load_state_dict(work / "nodes" / "model.safetensors"))


def test_resume_on_another_number_of_processes(one, work, data, monkeypatch, assert_same_training):
    def interrupted(self, *args):  # one process stopped 6 steps into epoch 2, after the step-12 checkpoint
        real(self, *args)
        if self.step == 14:
            raise KeyboardInterrupt

    real = loop.Trainer.after_step
    monkeypatch.setattr(loop.Trainer, "after_step", interrupted)
    out = work / "moved"
    assert main(["train", *TINY, "--data", str(data), "--batch-size", "16", "--out", str(out)]) == 130
    monkeypatch.undo()
    done = torchrun(work, "train", "--resume", "moved", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming moved at epoch 2, step 12/16" in done.stderr + done.stdout
    assert "16 (2 processes x 8, gloo)" in done.stderr + done.stdout  # the same global batch, split in two
    assert ("moved ran on 1 process(es), now on 2: it continues with the same global batch of 16, but not "
            "bit-exactly") in done.stderr + done.stdout
    assert_same_training(load_state_dict(one / "model.safetensors"), load_state_dict(out / "model.safetensors"))
    for r1, r2 in zip(rows(one), rows(out)):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5) and r1["test_top1"] == r2["test_top1"]


def test_torchrun_names_the_default_run_dir_after_its_job(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert default_out("fast") == Path("runs/fast-job-7")  # every rank, and a restart, find the same dir
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert default_out("fast").name.startswith("fast-2")


def vitlab_torchrun(cwd, *args, nproc=2, launcher=("--standalone",)):
    """`vitlab torchrun [launcher] --nproc-per-node=N args`, finished, output captured."""
    return subprocess.run([sys.executable, "-m", "vitlab", "torchrun", *launcher, f"--nproc-per-node={nproc}", *args],
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["in-use", "global-batch", "bad-flag"])
def test_a_refusal_is_one_line_from_rank_0_and_exit_2(case, one, work, data, held_run_lock):
    """vitlab's refusals under `vitlab torchrun`: rank 0's one line and nothing else (plain torchrun adds its
    ChildFailedError traceback, exit 1, after the same single line: below)."""
    nproc, out = 2, work / f"refused-{case}"
    if case == "in-use":  # a live process holds the run dir: only rank 0 claims it, every rank stops
        args, words = ["train", *TINY, "--data", str(data), "--batch-size", "8", "--out", out.name], "is in use by pid"
    elif case == "global-batch":  # one's global batch of 16 does not split over 3 processes (on every rank)
        nproc, args, words = 3, ["train", "--resume", str(one)], "global batch of 16 does not split over 3 processes"
    else:  # argparse, on every rank
        args, words = ["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag (see vitlab train --help)"
    with held_run_lock(out) if case == "in-use" else nullcontext():
        done = vitlab_torchrun(work, *args, nproc=nproc)
        [line] = done.stderr.strip().splitlines() or [""]
        assert done.returncode == 2 and line.startswith("vitlab train: error: ") and words in line, done.stderr
        assert "Traceback" not in done.stdout
        if case == "in-use":
            plain = torchrun(work, *args)
            assert plain.returncode == 1 and plain.stderr.count("vitlab train: error:") == 1, plain.stderr
    if case == "in-use":
        assert sorted(p.name for p in out.iterdir()) == [".vitlab-lock"]  # the holder's only


def test_a_busy_master_port_is_one_line_before_any_process_starts(work):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        done = vitlab_torchrun(work, "train", "--out", "never", launcher=(f"--master-port={port}",))
    assert done.returncode == 2 and done.stderr == (
        f"vitlab torchrun: error: --master-port {port} is in use on this machine (Address already in use); pick a "
        "free port, or on one machine leave --master-port out (torchrun then finds one)\n")
    assert not (work / "never").exists()


def test_vitlab_torchrun_trains_as_torchrun_does(two, work, data):
    """The same job through `vitlab torchrun`: the same weights as plain torchrun's, bit for bit."""
    done = vitlab_torchrun(work, "train", *TINY, "--data", str(data), "--batch-size", "8", "--out", "via-vitlab")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_state_dict(two[0] / "model.safetensors"), load_state_dict(work / "via-vitlab" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("launcher, port", [
    (["--standalone", "--master-port=1234"], None),  # --standalone: a free port of torchrun's choosing
    ([], None),  # one machine, no --master-port: torchrun switches to a free port
    (["--master-port=1234"], 1234),  # the static rendezvous listens on it here
    (["--nnodes=2", "--node-rank=0"], 29500),  # torchrun's default port, hosted by node 0
    (["--nnodes=2", "--node-rank=1", "--master-port=1234"], None),  # another machine hosts it
    (["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:1234"], None),  # c10d shares a busy endpoint by design
])
def test_vitlab_torchrun_checks_the_port_torchrun_will_listen_on(launcher, port):
    from torch.distributed import run as torch_run

    from vitlab.cli.torchrun import hosted_port, split_command

    argv = [*launcher, "--nproc-per-node=2", "train", "--out", "train"]  # split at the first command word
    opts, command = split_command(argv, {"train": None, "eval": None})
    assert opts == [*launcher, "--nproc-per-node=2"] and command == argv[len(opts):]
    assert hosted_port(torch_run.parse_args([*opts, "--module", "vitlab", *command])) == port
