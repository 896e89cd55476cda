"""End-to-end training on real CIFAR-10 subsets: it learns, it is deterministic, it resumes bit-exactly, and
under a time budget (driven by an injected clock, never real time) it ends in the last 5% of the budget; resume
and budget for the Swin too."""

import json

import pytest
import torch

from vitlab.model import VisionTransformer
from vitlab.train import callbacks, load_checkpoint, resolve_recipe, resume, runstate, train
from vitlab.train.classify import ClassifyTask
from vitlab.train.loop import Trainer
from vitlab.train.probes import probe_epoch_end, probe_step
from vitlab.weights import load_state_dict

# Tiny but with every source of randomness on: dropout, drop-path, EMA, TrivialAugment, mixup/cutmix,
# label smoothing, a held-out val split.
TINY = dict(model_args={"width": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "dropout": 0.1}, drop_path=0.1,
            ema=0.9, policy="trivial", mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, val_split=0.004,
            train_subset=256, test_subset=200, batch_size=64, epochs=3, warmup_epochs=1, precision="fp32",
            eval_batch_size=500)
# The same with the Swin test variant: its head and attention dropout on (the rest of TINY's randomness too).
SWIN = dict(model="swin-test", model_args={"drop_rate": 0.1, "attn_drop_rate": 0.1})



def tiny_run(out, cifar_dir, **kw):
    config = resolve_recipe("tutorial", **{**TINY, **kw})
    return train(config, out=out, data=cifar_dir, progress=False, log=lambda s: None)


def weights(run_dir):
    return load_state_dict(run_dir / "model.safetensors"), \
        load_state_dict(next((run_dir / "checkpoint").glob("step-*")) / "model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_run_learns(tmp_path, cifar_dir):
    """The tutorial model on 4,000 real images for 3 epochs: loss falls, test accuracy well above chance."""
    cfg = resolve_recipe("tutorial", train_subset=4000, test_subset=2000, epochs=3, batch_size=64, lr=3e-3,
                         warmup_epochs=0.5, weight_decay=0.05)
    res = train(cfg, out=tmp_path / "run", data=cifar_dir, progress=False, log=lambda s: None)
    rows = res.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] < 2.30  # ln(10): chance
    assert res.test_top1 > 0.25, rows
    # The run dir is a model dir: from_pretrained gives back the weights that scored it.
    model = VisionTransformer.from_pretrained(tmp_path / "run")
    assert model.read_class_names(tmp_path / "run")[:2] == ["airplane", "automobile"]
    proc = json.loads((tmp_path / "run" / "preprocessor_config.json").read_text())
    assert proc["image_processor_type"] == "ViTImageProcessor"
    assert proc["size"] == {"height": 32, "width": 32} and proc["resample"] == 3
    assert proc["do_resize"] and proc["do_rescale"] and proc["do_normalize"]
    assert proc["rescale_factor"] == pytest.approx(1 / 255)
    assert proc["image_mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert len(proc["image_std"]) == 3
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "lr",
            "images_per_sec", "elapsed_s"} <= set(header)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["torch"] == torch.__version__ and record["data"]["train_size"] == 4000
    assert record["task"] == "classify" and record["plan"]["total_steps"] == 3 * (4000 // 64)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps][:3] == [1, 10, 20] and steps[-1]["step"] == 3 * (4000 // 64)
    assert steps[-1]["loss"] < steps[0]["loss"]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("where, precision, model", [("mid-epoch", "fp32", {}), ("checkpoint-write", "fp32", {}),
                                                      ("mid-epoch", "bf16-pure", {}), ("mid-epoch", "fp32", SWIN),
                                                      ("checkpoint-write", "bf16-pure", SWIN)],
                         ids=["vit-mid-epoch", "vit-checkpoint-write", "vit-bf16", "swin-mid-epoch", "swin-bf16"])
def test_resume_is_bit_exact(tmp_path, cifar_dir, monkeypatch, where, precision, model):
    full = tiny_run(tmp_path / "full", cifar_dir, precision=precision, **model)
    assert "val_top1" in full.final and full.final["train_acc"] is None  # mixing: no train accuracy

    if where == "mid-epoch":  # killed a few steps into epoch 2
        real_step = Trainer.train_step

        def step(self, *a):
            if self.step == self.steps_per_epoch + 2:
                raise Interrupted
            return real_step(self, *a)
        monkeypatch.setattr(Trainer, "train_step", step)
    else:  # killed while writing the epoch-2 checkpoint: epoch 1's must survive
        real_save = runstate.save_checkpoint

        def save(run_dir, *, tensors, state):
            if state["epoch"] == 2:
                raise Interrupted
            return real_save(run_dir, tensors=tensors, state=state)
        monkeypatch.setattr(runstate, "save_checkpoint", save)
    with pytest.raises(Interrupted):
        tiny_run(tmp_path / "cut", cifar_dir, precision=precision, **model)
    monkeypatch.undo()
    resumed = resume(tmp_path / "cut", progress=False, log=lambda s: None)

    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3]
    for a, b in zip(weights(tmp_path / "full"), weights(tmp_path / "cut")):
        assert_same(a, b)
    for k in ("test_loss", "test_top1", "val_loss", "train_loss"):
        assert resumed.final[k] == full.final[k]


def test_same_seed_same_weights_other_seed_not(tmp_path, cifar_dir):
    kw = dict(epochs=1, ema=0.0, precision="bf16-pure")
    a = weights(tiny_run(tmp_path / "a", cifar_dir, **kw).run_dir)[0]
    b = weights(tiny_run(tmp_path / "b", cifar_dir, **kw).run_dir)[0]
    c = weights(tiny_run(tmp_path / "c", cifar_dir, seed=1, **kw).run_dir)[0]
    assert_same(a, b)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    # Gradient checkpointing recomputes the same activations (dropout RNG replayed): same weights.
    d = weights(tiny_run(tmp_path / "d", cifar_dir, grad_checkpointing=True, **kw).run_dir)[0]
    assert_same(a, d)


def test_ema_is_what_the_run_dir_holds(tmp_path, cifar_dir):
    run = tiny_run(tmp_path / "e", cifar_dir, epochs=1).run_dir
    folder = next((run / "checkpoint").glob("step-*"))
    published, raw = weights(run)
    assert_same(published, load_state_dict(folder / "ema.safetensors"))
    assert not torch.equal(published["head.weight"], raw["head.weight"])


def test_without_matplotlib_there_is_no_png_and_one_note(tmp_path, cifar_dir, monkeypatch):
    monkeypatch.setattr(callbacks, "figures", lambda: None)
    lines = []
    train(resolve_recipe("tutorial", **{**TINY, "epochs": 2}), out=tmp_path / "m", data=cifar_dir, progress=False,
          log=lines.append)
    assert not (tmp_path / "m" / "curves.png").exists() and (tmp_path / "m" / "metrics.csv").exists()
    assert sum("matplotlib is not installed" in line for line in lines) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_timing_leaves_no_trace(tmp_path, cifar_dir, precision):
    """--time-budget times real steps and a real save: weights, optimizer, RNGs, run dir come back as they were."""
    cfg = resolve_recipe("tutorial", **{**TINY, "precision": precision})
    task = ClassifyTask(cfg, device=torch.device("cpu"), data=cifar_dir)
    trainer = Trainer(task, tmp_path, record={}, progress=False, log=lambda s: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = [torch.get_rng_state()] + [g.get_state() for g in trainer.generators.values()]
    timed = probe_epoch_end(trainer)
    assert probe_step(trainer) > 0 and timed["epoch_end_s"] > 0 and timed["final_s"] == 0  # no TTA
    assert_same(before, trainer.model.state_dict())
    for a, b in zip(rng, [torch.get_rng_state()] + [g.get_state() for g in trainer.generators.values()]):
        assert torch.equal(a, b)
    assert not trainer.optimizer.state and all(p.grad is None for p in trainer.model.parameters())
    assert list(tmp_path.iterdir()) == []  # the scratch save is gone


TEARDOWN_S = 0.9  # interpreter exit after the last file, as measured on the 2-core CPU


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def budget_run(tmp_path, cifar_dir, monkeypatch, *, minutes, step_cost, eval_cost, save_cost=0.3, startup=6.0,
               model=None):
    """A real tiny run whose clock only moves by simulated costs: start-up, each step, evaluation, save.
    `model`: model / model_args instead of the 16-wide ViT. Returns (result, end of the process on that clock,
    train_config.json)."""
    clock = FakeClock()
    real_step, real_eval, real_save = Trainer.train_step, ClassifyTask.evaluate, Trainer.save

    def step(self, batch):
        clock.t += step_cost(clock.t)
        return real_step(self, batch)

    def evaluate(self, model, **kw):  # cost proportional to the images evaluated (the budget times a slice)
        clock.t += eval_cost(clock.t) * min(kw.get("limit") or self.eval_size, self.eval_size) / self.eval_size
        return real_eval(self, model, **kw)

    def save(self, *a, **kw):
        clock.t += save_cost
        return real_save(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(ClassifyTask, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "save", save)
    monkeypatch.setattr(callbacks, "figures", lambda: None)  # no figures: real drawing time would only slow the test
    cfg = resolve_recipe("tutorial", **(model or dict(model_args={"width": 16, "depth": 1, "heads": 2, "mlp_dim": 32})),
                         train_subset=2048, test_subset=200, batch_size=32, eval_batch_size=50, epochs=1000,
                         precision="fp32", time_budget=minutes)
    clock.t += startup
    task = ClassifyTask(cfg, device=torch.device("cpu"), data=cifar_dir)
    res = Trainer(task, tmp_path / "b", record={}, progress=False, log=lambda s: None, clock=clock,
                  started_at=0.0).run()
    return res, clock.t + TEARDOWN_S, json.loads((tmp_path / "b" / "train_config.json").read_text())


@pytest.mark.parametrize("model", [None, {"model": "swin-test"}], ids=["vit", "swin"])
def test_time_budget_ends_in_the_last_5_percent(tmp_path, cifar_dir, monkeypatch, model):
    res, end, record = budget_run(tmp_path, cifar_dir, monkeypatch, minutes=2, step_cost=lambda t: 0.4,
                                  eval_cost=lambda t: 2.0, model=model)
    assert 0.95 * 120 <= end <= 120
    assert record["plan"]["step_s"] == pytest.approx(0.4) and record["plan"]["epoch_end_s"] > 2.0
    _, state = load_checkpoint(tmp_path / "b")
    assert state["finished"] and res.final["step"] == state["step"] == state["total_steps"]  # the cosine ran out
    assert res.final["lr"] < 0.02 * resolve_recipe("tutorial").lr
    assert len(res.metrics) == -(-state["step"] // 64)  # an evaluation per epoch, a partial last one included


@pytest.mark.parametrize("drift", ["slower", "faster", "slower evaluation"])
def test_time_budget_follows_a_drifting_machine(tmp_path, cifar_dir, monkeypatch, drift):
    steps = {"slower": lambda t: 0.5 if t < 60 else 1.0, "faster": lambda t: 1.0 if t < 60 else 0.5}
    res, end, _ = budget_run(tmp_path, cifar_dir, monkeypatch, minutes=2, step_cost=steps.get(drift, lambda t: 0.7),
                             eval_cost=(lambda t: 1.0 if t < 60 else 4.0) if drift == "slower evaluation"
                             else lambda t: 2.0)
    assert 0.95 * 120 <= end <= 120, (end, res.final)


def test_onecycle_rises_over_two_fifths_of_the_run_whatever_warmup_epochs_says(tmp_path, cifar_dir):
    task = ClassifyTask(resolve_recipe("tutorial", **{**TINY, "decay": "onecycle", "warmup_epochs": 1, "epochs": 5}),
                        device=torch.device("cpu"), data=cifar_dir)
    trainer = Trainer(task, tmp_path / "r", record={}, progress=False, log=lambda s: None)
    total = 5 * trainer.steps_per_epoch
    assert trainer.total_steps == total
    assert trainer.schedule.warmup_steps == round(0.4 * total) > trainer.steps_per_epoch
    trainer.set_total_steps(30)  # a time budget's re-plan keeps the share
    assert trainer.warmup_steps(30) == 12


def test_existing_run_dir_is_refused(tmp_path, cifar_dir):
    tiny_run(tmp_path / "r", cifar_dir, epochs=1)
    with pytest.raises(ValueError, match="already holds a run"):
        tiny_run(tmp_path / "r", cifar_dir, epochs=1)
    done = resume(tmp_path / "r", progress=False, log=lambda s: None)  # complete: nothing to do
    assert [r["epoch"] for r in done.metrics] == [1]
