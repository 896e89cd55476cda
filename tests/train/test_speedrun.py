"""Issue 12's training levers in the real loop: progressive resizing (resumes exactly across the switch, the
time budget counts its cheaper steps), distillation from a CNN teacher, Muon, alternating flips, TTA, linear
decay."""

import json
import math

import pytest
import torch

from vitlab.distill import TeacherNet
from vitlab.train import callbacks, resolve_recipe, resume, train
from vitlab.train.classify import ClassifyTask
from vitlab.train.loop import Trainer
from vitlab.train.optim import WarmupCosine
from vitlab.weights import load_state_dict

TINY = dict(model_args={"width": 16, "depth": 2, "heads": 2, "mlp_dim": 32}, train_subset=256, test_subset=200,
            batch_size=64, epochs=3, warmup_epochs=1, precision="fp32", eval_batch_size=200)


def quiet(**kw):
    return dict(progress=False, log=lambda s: None, **kw)


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, step_no):
    real_step = Trainer.train_step

    def step(self, batch):
        if self.step == step_no:
            raise Interrupted
        return real_step(self, batch)
    monkeypatch.setattr(Trainer, "train_step", step)


def final_weights(run_dir):
    return load_state_dict(next((run_dir / "checkpoint").glob("step-*")) / "model.safetensors")


def test_resize_schedule_switches_sizes_and_resumes_exactly_across_the_switch(tmp_path, cifar_dir, monkeypatch):
    cfg = resolve_recipe("tutorial", **TINY, resize_schedule="16:0.5", optimizer="muon")
    sizes = []
    real_batch = ClassifyTask.batch

    def batch(self, index, step, **kw):
        b = real_batch(self, index, step, **kw)
        if not kw:
            sizes.append((step, b.inputs.shape[-1]))
        return b
    monkeypatch.setattr(ClassifyTask, "batch", batch)
    train(cfg, out=tmp_path / "full", data=cifar_dir, **quiet())
    total = 3 * (256 // 64)
    assert sizes == [(s, 16 if s < total // 2 else 32) for s in range(total)]
    monkeypatch.undo()

    interrupt_at(monkeypatch, 256 // 64 + 1)  # step 5 of 12: before the switch at step 6
    with pytest.raises(Interrupted):
        train(cfg, out=tmp_path / "cut", data=cifar_dir, **quiet())
    monkeypatch.undo()
    resume(tmp_path / "cut", **quiet())
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("schedule", ["16:0.5", "8:0.3,16:0.7"])
def test_time_budget_plans_with_the_cheaper_small_steps(tmp_path, cifar_dir, monkeypatch, schedule):
    """Steps cost in proportion to their tokens (a fake clock): the run still ends in the last 5% of the
    budget, and fits more steps than at full size only."""
    clock = FakeClock()
    real_step = Trainer.train_step

    def step(self, batch):
        clock.t += 0.5 * (batch.inputs.shape[-1] / 32) ** 2
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **kw: setattr(clock, "t", clock.t + 0.2))
    monkeypatch.setattr(ClassifyTask, "evaluate", lambda self, model, **kw: (setattr(clock, "t", clock.t + 0.5),
                                                                              {"test_top1": 0.1})[1])
    monkeypatch.setattr(callbacks, "figures", lambda: None)
    ends = {}
    for sched in ("", schedule):
        clock.t = 3.0  # start-up
        cfg = resolve_recipe("tutorial", **{**TINY, "train_subset": 2048, "batch_size": 32, "epochs": 1000,
                                            "time_budget": 1.5, "resize_schedule": sched})
        task = ClassifyTask(cfg, device=torch.device("cpu"), data=cifar_dir)
        res = Trainer(task, tmp_path / f"b{len(sched)}", record={}, clock=clock, started_at=0.0, **quiet()).run()
        end = clock.t + 0.9  # + interpreter exit
        assert 0.95 * 90 <= end <= 90, (sched, end)
        ends[sched] = res.final["step"]
    assert ends[schedule] > 1.3 * ends[""]  # the small steps were counted as cheap


def test_distillation_from_a_cnn_teacher_learns(tmp_path, cifar_dir, monkeypatch):
    """A teacher trained by the same loop, then a ViT with a distillation token: the loss sees the teacher's
    logits, both heads train, and the student learns."""
    teacher_cfg = resolve_recipe("teacher", model="cnn-8-16-32", train_subset=2048, test_subset=500, epochs=3,
                                 batch_size=64, lr=1e-2, precision="fp32")
    t = train(teacher_cfg, out=tmp_path / "teacher", data=cifar_dir, **quiet())
    assert t.test_top1 > 0.3 and isinstance(TeacherNet.from_pretrained(tmp_path / "teacher"), TeacherNet)
    seen = []
    real_loss = ClassifyTask.loss

    def loss(self, outputs, batch):
        seen.append((isinstance(outputs, tuple), isinstance(batch.targets, tuple)))
        return real_loss(self, outputs, batch)
    monkeypatch.setattr(ClassifyTask, "loss", loss)
    cfg = resolve_recipe("tutorial", **{**TINY, "train_subset": 2048, "test_subset": 500, "epochs": 3, "lr": 3e-3,
                                        "model_args": {"width": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                                                       "distill_token": True}},
                         teacher=str(tmp_path / "teacher"))
    s = train(cfg, out=tmp_path / "student", data=cifar_dir, **quiet())
    assert seen and all(o and t for o, t in seen)  # (class, distillation) heads; (targets, teacher logits)
    assert s.test_top1 > 0.15 and s.metrics[-1]["train_loss"] < s.metrics[0]["train_loss"]
    # the distillation head learned the teacher: it agrees with it more than the label-trained class head does
    from vitlab.data import load_cifar10, normalize
    from vitlab.model import VisionTransformer

    test = load_cifar10(cifar_dir, "test")
    x = normalize(test.images[:500], task_stats(tmp_path / "student")[0], task_stats(tmp_path / "student")[1])
    student = VisionTransformer.from_pretrained(tmp_path / "student").train()
    student.set_distilled_training(True)
    with torch.no_grad():
        cls_head, dist_head = student(x)
        teacher = TeacherNet.from_pretrained(tmp_path / "teacher")(x).argmax(1)
    agree = [(h.argmax(1) == teacher).float().mean().item() for h in (cls_head, dist_head)]
    assert agree[1] > agree[0] + 0.03, agree


def task_stats(run_dir):
    proc = json.loads((run_dir / "preprocessor_config.json").read_text())
    return tuple(proc["image_mean"]), tuple(proc["image_std"])


def test_teacher_stage_trains_the_teacher_inside_the_run(tmp_path, cifar_dir, monkeypatch):
    import dataclasses

    from vitlab.train import recipes

    small = dataclasses.replace(recipes.RECIPES["teacher"], model="cnn-8-16-16", epochs=1)
    monkeypatch.setitem(recipes.RECIPES, "small-teacher", small)
    cfg = resolve_recipe("tutorial", **{**TINY, "epochs": 1}, teacher="stage", teacher_recipe="small-teacher")
    train(cfg, out=tmp_path / "run", data=cifar_dir, **quiet())
    teacher = json.loads((tmp_path / "run" / "teacher" / "train_config.json").read_text())
    assert teacher["config"]["model"] == "cnn-8-16-16" and teacher["config"]["train_subset"] == 256
    assert (tmp_path / "run" / "teacher" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["teacher"] == "stage"
    resume(tmp_path / "run", **quiet())  # finished teacher and student: nothing to do, no error


def test_alternating_flip_flips_each_image_every_other_epoch(cifar_dir):
    cfg = resolve_recipe("tutorial", **TINY, alternate_flip=True, crop_padding=0)
    task = ClassifyTask(cfg, device=torch.device("cpu"), data=cifar_dir)
    task.set_schedule(total_steps=12, steps_per_epoch=4)
    index = torch.arange(64)
    raw = task.augment.eval_transform(task.images[index])
    flipped = [(task.batch(index, step).inputs == raw.flip(-1)).flatten(1).all(1) for step in (0, 4, 8)]
    kept = (task.batch(index, 0).inputs == raw).flatten(1).all(1)
    assert torch.equal(flipped[0], ~kept) and 10 < int(flipped[0].sum()) < 54  # a random half at first
    assert torch.equal(flipped[1], ~flipped[0]) and torch.equal(flipped[2], flipped[0])


def test_final_evaluation_adds_tta_metrics(tmp_path, cifar_dir):
    res = train(resolve_recipe("tutorial", **{**TINY, "epochs": 2}, tta="flip"), out=tmp_path / "r",
                data=cifar_dir, **quiet())
    assert "test_top1_tta" not in res.metrics[0] and "test_top1_tta" in res.metrics[-1]
    from vitlab.train.evaluate import evaluate_run
    assert evaluate_run(tmp_path / "r", data=cifar_dir, tta="flip", progress=False)["tta"] == "flip"


def test_linear_decay():
    s = WarmupCosine(1.0, total_steps=12, warmup_steps=2, decay="linear")
    assert [s(i) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert s(7) == pytest.approx(0.5) and s(11) == pytest.approx(0.1)
    assert WarmupCosine(1.0, 12, 2)(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
