"""`--tensorboard`: event files read back with TensorBoard's own EventAccumulator hold exactly metrics.jsonl and
steps.jsonl, and one attention-rollout figure per evaluation; a resumed run appends without duplicated steps;
without the package the run goes on with a one-line note. Tiny runs on synthetic CIFAR (no real data needed)."""

import io
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.model import VisionTransformer
from vitlab.train import resolve_recipe, resume, train
from vitlab.train.loop import Trainer
from vitlab.train.tensorboard import ROLLOUT_IMAGES, ROLLOUT_TAG, RolloutProbe, open_tensorboard

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'vitlab[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--recipe", "tutorial", "--epochs", "2", "--batch-size", "32", "--model", "test", "--model-arg", "depth=2",
        "--precision", "fp32", "--no-progress"]
TINY_CFG = dict(model="test", model_args={"depth": 2}, batch_size=32, epochs=3,
                precision="fp32", ema=0.9, log_every=3, tensorboard=True)


def read_events(run_dir) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The curves as the README names them, built from the run's own jsonl files."""
    out: dict[str, list] = {}
    for rows, group in ((jsonl(run_dir / "steps.jsonl"), "step"), (jsonl(run_dir / "metrics.jsonl"), "epoch")):
        for r in rows:
            for k, v in r.items():
                if k in ("epoch", "step") or v is None:
                    continue
                split, _, name = k.partition("_")
                tag = f"{split}/{name}" if group == "epoch" and split in ("train", "test", "val") else f"{group}/{k}"
                out.setdefault(tag, []).append((r["step"], v))
    return out


def assert_scalars_match_jsonl(run_dir) -> EventAccumulator:
    ea = read_events(run_dir)
    expected = expected_scalars(run_dir)
    assert {"step/loss", "step/lr", "train/loss", "test/loss", "test/top1", "epoch/lr",
            "epoch/images_per_sec"} <= set(expected)
    assert set(ea.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # each step once, in order
        np.testing.assert_allclose([v for _, v in got], [v for _, v in points], rtol=1e-6, err_msg=tag)  # float32
    return ea


def rollout_images(ea) -> list[tuple[int, np.ndarray]]:
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in ea.Images(ROLLOUT_TAG)]


def figure_size(n: int) -> tuple[int, int]:
    """(height, width) of `vitlab explain`'s rollout figure of n CIFAR images, as save_figure writes it."""
    from vitlab.inspect import plots

    fig = plots.plot_rollout(np.zeros((n, 3, 32, 32), np.uint8), np.zeros((n, 8, 8)),
                             labels=[plots.ImageLabel("x")] * n, title="t")
    w, h = plots.figure_pixels(fig)
    return h, w


def first_test_images(cifar_root, n):
    """The first n records of test_batch.bin (label byte + 3072 pixel bytes), read without vitlab."""
    rec = np.fromfile(cifar_root / "test_batch.bin", np.uint8).reshape(-1, 3073)[:n]
    return torch.from_numpy(rec[:, 1:].reshape(n, 3, 32, 32).copy()), torch.from_numpy(rec[:, 0].astype(np.int64))


def paper_rollout_cls(model, x) -> torch.Tensor:
    """Abnar & Zuidema 2020: per layer 0.5 * mean-over-heads attention + 0.5 * I, multiplied over the layers; the
    class token's row over the patches, (B, gh, gw)."""
    with torch.no_grad():
        _, attns = model.eval()(x, return_attention=True)
    r = None
    for a in attns:
        a = 0.5 * a.float().mean(1) + 0.5 * torch.eye(a.shape[-1])
        r = a if r is None else a @ r
    g = model.cfg.grid_size
    return r[:, 0, 1:].reshape(-1, g, g)


def test_train_writes_metrics_and_a_rollout_per_evaluation(tmp_path, tiny_cifar):
    data = tiny_cifar(tmp_path / "cifar10", train=256, test=32)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--ema", "0.9", "--tensorboard"]) == 0
    ea = assert_scalars_match_jsonl(out)

    evals = [r["step"] for r in jsonl(out / "metrics.jsonl")]
    images = rollout_images(ea)
    assert [s for s, _ in images] == evals == [8, 16]
    for _, img in images:
        assert img.shape == (*figure_size(ROLLOUT_IMAGES), 3)

    # The last figure is the rollout of the first test images under the weights the run saved (the EMA's).
    model = VisionTransformer.from_pretrained(out)
    proc = json.loads((out / "preprocessor_config.json").read_text())
    images_u8, labels = first_test_images(data, ROLLOUT_IMAGES)
    probe = RolloutProbe(images_u8, labels, model.read_class_names(out), mean=tuple(proc["image_mean"]),
                         std=tuple(proc["image_std"]))
    np.testing.assert_array_equal(images[-1][1], probe.image(model, step=16))
    heat, probs = probe.maps(model)
    mean, std = torch.tensor(proc["image_mean"]).view(1, 3, 1, 1), torch.tensor(proc["image_std"]).view(1, 3, 1, 1)
    x = (images_u8.float() / 255 - mean) / std
    torch.testing.assert_close(heat, paper_rollout_cls(model, x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs, model(x).softmax(-1))


class Interrupted(Exception):
    pass


def test_resume_appends_without_duplicated_steps(tmp_path, tiny_cifar, monkeypatch):
    data = tiny_cifar(tmp_path / "cifar10", train=256, test=32)
    cfg = resolve_recipe("tutorial", **TINY_CFG)
    real_step = Trainer.train_step

    def step(self, *a):  # killed 5 steps into epoch 3, after the epoch-2 checkpoint (step 16)
        if self.step == 2 * self.steps_per_epoch + 5:
            raise Interrupted
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(Interrupted):
        train(cfg, out=tmp_path / "cut", data=data, progress=False, log=lambda s: None)
    monkeypatch.undo()
    stale = read_events(tmp_path / "cut")  # what the killed process left: points past its last checkpoint
    assert max(e.step for e in stale.Scalars("step/loss")) == 2 * 8 + 5

    resume(tmp_path / "cut", progress=False, log=lambda s: None)
    assert len(list((tmp_path / "cut" / "tb").glob("events.out.tfevents.*"))) == 2  # appended, not rewritten
    ea = assert_scalars_match_jsonl(tmp_path / "cut")
    assert [s for s, _ in rollout_images(ea)] == [8, 16, 24]

    # and the curves are those of a run that never stopped
    full = train(cfg, out=tmp_path / "full", data=data, progress=False, log=lambda s: None)
    full_ea = read_events(full.run_dir)
    for tag in ("step/loss", "test/loss", "train/loss"):
        assert [(e.step, e.value) for e in ea.Scalars(tag)] == [(e.step, e.value) for e in full_ea.Scalars(tag)]
    for (_, a), (_, b) in zip(rollout_images(ea), rollout_images(full_ea)):
        np.testing.assert_array_equal(a, b)


def test_train_clip_writes_zero_shot_metrics_and_rollouts(tmp_path, tiny_cifar):
    data = tiny_cifar(tmp_path / "cifar10", train=128, test=32)
    out = tmp_path / "clip"
    assert main(["train-clip", "--data", str(data), "--out", str(out), "--time-budget", "0", "--epochs", "2",
                 "--batch-size", "32", "--width", "16", "--depth", "2", "--heads", "2", "--text-width", "16",
                 "--text-depth", "1", "--log-every", "2", "--no-progress", "--tensorboard"]) == 0
    ea = assert_scalars_match_jsonl(out)
    images = rollout_images(ea)
    assert [s for s, _ in images] == [r["step"] for r in jsonl(out / "metrics.jsonl")] == [4, 8]
    assert images[0][1].shape == (*figure_size(ROLLOUT_IMAGES), 3)  # the image tower's rollout (gap pooling)


def test_without_the_package_one_line_and_the_run_goes_on(tmp_path, tiny_cifar, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `from torch.utils.tensorboard import` fails
    data = tiny_cifar(tmp_path / "cifar10", train=64, test=32)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--tensorboard"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "tensorboard" in line.lower()]
    assert len(lines) == 1 and "not installed" in lines[0] and "vitlab[tensorboard]" in lines[0], lines
    assert not (out / "tb").exists()
    assert len(jsonl(out / "metrics.jsonl")) == 2 and len((out / "metrics.csv").read_text().splitlines()) == 3


def test_only_rank_0_and_only_when_asked():
    def fail(line):
        raise AssertionError(line)

    for config, is_main in ((SimpleNamespace(tensorboard=True), False), (SimpleNamespace(tensorboard=False), True)):
        assert open_tensorboard(SimpleNamespace(config=config, is_main=is_main, log=fail)) is None
