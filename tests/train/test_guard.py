"""The non-finite guard, the SIGTERM handler and the run-dir claim, on tiny runs of random images (no real data).

NaN is injected where it really arises: in a batch's pixels, so the loss, the gradients and (without the
guard) the weights all become NaN.
"""

import json
import os
import signal
import time

import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.train import load_checkpoint, resolve_recipe, resume, train
from vitlab.train.classify import ClassifyTask
from vitlab.train.guard import (
    MAX_SKIPS,
    Decision,
    DivergedError,
    NonFiniteGuard,
    Terminated,
    interrupt_exit_code,
    sigterm_interrupts,
)
from vitlab.train.lock import RunLock
from vitlab.train.loop import Trainer
from vitlab.weights import load_state_dict

STEPS_PER_EPOCH = 4  # 64 images, batches of 16
TINY_LR = resolve_recipe("tutorial").lr
TINY = dict(model_args={"width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}, train_subset=64, test_subset=32,
            batch_size=16, epochs=3, warmup_epochs=1, precision="fp32", eval_batch_size=32, grad_clip=1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("guard") / "cifar10")


def run(out, data, log=None, **kw):
    return train(resolve_recipe("tutorial", **{**TINY, **kw}), out=out, data=data, progress=False,
                 log=log or (lambda s: None))


def poison(monkeypatch, steps):
    """A NaN pixel in the batches of these (0-based) steps."""
    real = ClassifyTask.batch

    def batch(self, index, step, **kw):
        b = real(self, index, step, **kw)
        if step in steps:
            b.inputs[0, 0, 0, 0] = float("nan")
        return b
    monkeypatch.setattr(ClassifyTask, "batch", batch)


def record_weights(monkeypatch):
    """Trainer step -> a copy of the weights after it."""
    seen, real = {}, Trainer.after_step

    def after_step(self, *a):
        seen[self.step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real(self, *a)
    monkeypatch.setattr(Trainer, "after_step", after_step)
    return seen


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    poison(monkeypatch, {STEPS_PER_EPOCH + 1})  # the 6th step, in epoch 2
    with pytest.raises(DivergedError) as e:
        run(tmp_path / "r", data)
    msg = str(e.value)
    assert "diverged at step 6" in msg and "loss nan" in msg and "(epoch 1, step 4) is kept" in msg, msg
    assert "\n" not in msg and "--lr" in msg
    tensors, state = load_checkpoint(tmp_path / "r")
    assert state["step"] == 4 and all_finite(tensors["model"])
    published = load_state_dict(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(published[k], tensors["model"][k]) for k in published)  # the run dir: epoch 1 too
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1  # no row for the NaN epoch
    with RunLock(tmp_path / "r") as lock:  # released, and cleanly (no stale holder)
        assert lock.stale is None


def test_non_finite_weights_are_caught_before_an_evaluation(tmp_path, data, monkeypatch):
    """Weights that went Inf with a finite loss and norm (set by hand after the last step of epoch 2)."""
    real = Trainer.after_step

    def after_step(self, *a):
        if self.step == 2 * STEPS_PER_EPOCH:
            with torch.no_grad():
                self.model.head.weight[0, 0] = float("inf")
        return real(self, *a)
    monkeypatch.setattr(Trainer, "after_step", after_step)
    with pytest.raises(DivergedError, match=r"step 8 \(weights: non-finite .*'head.weight' \(1 of 160 .*"
                                            r"\(epoch 1, step 4\) is kept"):
        run(tmp_path / "w", data)
    assert len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 2 never evaluated


def test_skip_mode_skips_the_update_and_halves_the_learning_rate(tmp_path, data, monkeypatch):
    poison(monkeypatch, {STEPS_PER_EPOCH + 1})
    weights, lines = record_weights(monkeypatch), []
    res = run(tmp_path / "s", data, log=lines.append, on_nonfinite="skip")
    assert [r["epoch"] for r in res.metrics] == [1, 2, 3]
    assert all(torch.equal(weights[6][k], weights[5][k]) for k in weights[5])  # step 6 changed nothing
    assert not torch.equal(weights[7]["head.weight"], weights[6]["head.weight"])  # step 7 did
    tensors, state = load_checkpoint(tmp_path / "s")
    assert all_finite(tensors["model"]) and all(r["train_loss"] == r["train_loss"] for r in res.metrics)
    assert state["schedule"]["base_lr"] == TINY_LR / 2 and state["guard"] == {"skipped": 1, "in_a_row": 0}
    assert int(tensors["optimizer"]["state.0.step"]) == 3 * STEPS_PER_EPOCH - 1  # AdamW saw 11 of 12 steps
    assert sum("step 6: loss nan" in line and "update skipped" in line for line in lines) == 1


def test_skip_mode_stops_after_too_many_skips_in_a_row(tmp_path, data, monkeypatch):
    poison(monkeypatch, set(range(2, 2 + MAX_SKIPS)))
    with pytest.raises(DivergedError, match=f"diverged at step {2 + MAX_SKIPS} \\({MAX_SKIPS} steps in a row"):
        run(tmp_path / "k", data, on_nonfinite="skip")
    assert load_checkpoint(tmp_path / "k")[1]["step"] == 4


class Interrupted(Exception):
    pass


def test_skip_mode_resumes_bit_exactly(tmp_path, data, monkeypatch):
    """The lowered learning rate and the skip counters are part of the checkpoint."""
    poison(monkeypatch, {1, STEPS_PER_EPOCH + 2})
    full = run(tmp_path / "full", data, on_nonfinite="skip", ema=0.9)
    real = Trainer.train_step

    def step(self, *a):
        if self.step == 2 * STEPS_PER_EPOCH + 1:
            raise Interrupted
        return real(self, *a)
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", data, on_nonfinite="skip", ema=0.9)
    monkeypatch.setattr(Trainer, "train_step", real)
    resumed = resume(tmp_path / "cut", progress=False, log=lambda s: None)
    a, b = (load_state_dict(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_loss"] for r in resumed.metrics] == [r["test_loss"] for r in full.metrics]
    assert load_checkpoint(tmp_path / "cut")[1]["guard"] == {"skipped": 2, "in_a_row": 0}


@pytest.mark.parametrize("every", [1, 4])
def test_cadence_finds_the_first_bad_step(tmp_path, every):
    guard = NonFiniteGuard("stop", every=every, run_dir=tmp_path, lr=1e-3, grad_clip=0.0)
    values = [(1.0, 2.0), (1.0, float("inf")), (float("nan"), 1.0)]
    decisions = []
    for step, (loss, norm) in enumerate(values, start=1):
        decisions.append(guard.observe(step, torch.tensor(loss), torch.tensor(norm)))
        if decisions[-1] is Decision.STOP:  # the loop raises DivergedError(guard.reason) here
            break
    if every > 1:  # nothing read yet: the check before an evaluation reads the three steps at once
        assert decisions == [Decision.CONTINUE] * 3
        assert guard.check(3) is Decision.STOP
    else:
        assert decisions[:2] == [Decision.CONTINUE, Decision.STOP]
    msg = guard.reason
    assert "diverged at step 2 (non-finite values: loss 1, gradient norm inf)" in msg
    assert "--grad-clip 1" in msg and "no checkpoint had been written yet" in msg
    assert guard.check(3, model=torch.nn.Linear(2, 2)) is Decision.CONTINUE  # read: nothing pending, finite weights
    bad = torch.nn.Linear(2, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    assert guard.check(4, model=bad) is Decision.STOP and "diverged at step 4" in guard.reason


def test_skip_mode_decides_and_counts_the_last_taken_loss(tmp_path):
    """The guard only decides: SKIP for a skipped update (the loss counted is the last taken one's), STOP after
    MAX_SKIPS in a row; a taken step resets the run of skips."""
    guard, good, nan = NonFiniteGuard("skip", run_dir=tmp_path), torch.tensor(0.5), torch.tensor(float("nan"))
    assert guard.observe(1, good, None) is Decision.CONTINUE
    decision = guard.observe(2, nan, None, skipped=True)
    assert decision is Decision.SKIP and guard.counted(nan, decision) is good and "update skipped" in guard.reason
    assert guard.observe(3, good, None) is Decision.CONTINUE and guard.in_a_row == 0
    decisions = [guard.observe(4 + i, nan, None, skipped=True) for i in range(MAX_SKIPS)]
    assert decisions == [Decision.SKIP] * (MAX_SKIPS - 1) + [Decision.STOP]
    assert f"{MAX_SKIPS} steps in a row were skipped" in guard.reason and "--on-nonfinite skip" not in guard.reason
    assert guard.state_dict() == {"skipped": MAX_SKIPS + 1, "in_a_row": MAX_SKIPS}


def test_guard_state_is_checked(tmp_path):
    guard = NonFiniteGuard("skip")
    guard.load_state_dict({"skipped": 3, "in_a_row": 1})
    assert guard.state_dict() == {"skipped": 3, "in_a_row": 1}
    for bad in ({"skipped": -1}, {"in_a_row": "2"}, [1]):
        with pytest.raises(VitlabError, match="guard"):
            guard.load_state_dict(bad, source="state.json")
    with pytest.raises(VitlabError, match="on_nonfinite must be one of stop, skip"):
        NonFiniteGuard("ignore")
    with pytest.raises(VitlabError, match="on_nonfinite must be one of stop, skip"):
        resolve_recipe("tutorial", on_nonfinite="ignore")


def test_sigterm_raises_a_resumable_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e, sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted at once by the handler
    assert isinstance(e.value, KeyboardInterrupt) and str(e.value) == "terminated (SIGTERM)"
    assert interrupt_exit_code(e.value) == 143 and interrupt_exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_run_started_meanwhile_is_not_overwritten(tmp_path, data):
    """train() checks the run dir before loading the data; the trainer checks again once it holds the lock."""
    cfg = resolve_recipe("tutorial", **TINY)
    trainer = Trainer(ClassifyTask(cfg, device=torch.device("cpu"), data=data), tmp_path / "t", record={},
                      progress=False, log=lambda s: None)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train_config.json").write_text(json.dumps({"config": {}}))  # another process's run
    with pytest.raises(VitlabError, match="already holds a run"):
        trainer.run()
    # the refused trainer leaves the dir as it found it: the other run's file, no lock file of its own (issue 19)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["train_config.json"]
    with RunLock(tmp_path / "t", command="someone else"), pytest.raises(VitlabError, match="in use by pid"):
        trainer.run()
