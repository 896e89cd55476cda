"""`--data-mode stream` on a small JPEG folder: training end to end through DataLoader workers, an unreadable file
skipped and counted, a run interrupted mid-epoch resumed from its mid-epoch checkpoint to the same weights,
streamed evaluation equal to the in-memory one, 2 processes equal to 1 at the same global batch, and the
memory / stream choice."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import torchrun
from vitlab.cli import main
from vitlab.data import stream
from vitlab.errors import VitlabError
from vitlab.model import create_model, parse_variant
from vitlab.train import loop, resolve_recipe, resume, train
from vitlab.train.classify import ClassifyTask
from vitlab.train.streaming import StreamTask, classify_task, resolve_data_mode
from vitlab.weights import load_state_dict

CLASSES = ("cat", "dog", "fox")
TINY = dict(model="tutorial", model_args={"width": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "dropout": 0.1},
            dataset="folder", data_mode="stream", image_size=24, workers=1, batch_size=8, epochs=2,
            warmup_epochs=0.5, precision="fp32", eval_batch_size=10, checkpoint_every=2, policy="trivial",
            drop_path=0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ 3 classes x 14 JPEGs of assorted sizes (+ one broken file), test/ 3 x 4."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 14), ("test", 4)):
        for label, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(28, 64, 2)
                pixels = rng.integers(0, 256, (h, w, 3)) // 2 + 80 * label  # the classes differ in brightness
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / c / f"{i:02d}.jpg", quality=90)
    (root / "train" / "dog" / "05b.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the memory mode's decoded-folder cache


def run(out, folder, **kw):
    return train(resolve_recipe("tutorial", **{**TINY, **kw}), out=out, data=folder, progress=False,
                 log=lambda s: None)


def test_streamed_run_resumes_mid_epoch_to_the_same_weights(tmp_path, folder, monkeypatch):
    full = run(tmp_path / "full", folder)
    record = json.loads((tmp_path / "full" / "train_config.json").read_text())
    assert record["config"]["data_mode"] == "stream" and record["data"]["data_mode"] == "stream"
    assert record["data"]["train_size"] == 43 and record["plan"]["steps_per_epoch"] == 5  # 43 // 8
    assert [r["epoch"] for r in full.metrics] == [1, 2] and full.final["skipped_files"] >= 1

    def interrupted(self, *args):  # killed 2 steps into epoch 2, one step after the mid-epoch checkpoint at 6
        real(self, *args)
        if self.step == 7:
            raise KeyboardInterrupt

    real = loop.Trainer.after_step
    monkeypatch.setattr(loop.Trainer, "after_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", folder)
    monkeypatch.undo()
    state = json.loads(next((tmp_path / "cut" / "checkpoint").glob("step-*/state.json")).read_text())
    assert state["step"] == 6 and state["epoch"] == 1 and state["task"]["stream"]["position"] == 1
    resumed = resume(tmp_path / "cut", progress=False, log=lambda s: None)
    a, b = (load_state_dict(tmp_path / r / "model.safetensors") for r in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r1, r2 in zip(full.metrics, resumed.metrics, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-6)
        assert r1["test_loss"] == r2["test_loss"] and r1["test_top1"] == r2["test_top1"]


def test_streamed_evaluation_is_the_in_memory_one(tmp_path, folder):
    config = resolve_recipe("tutorial", **TINY)
    streamed = classify_task(config, device=torch.device("cpu"), data=folder)
    memory = classify_task(dataclasses.replace(config, data_mode="memory"), device=torch.device("cpu"), data=folder)
    assert type(streamed) is StreamTask and type(memory) is ClassifyTask
    assert memory.images.shape == (14 * 3, 3, 24, 24)  # the 42 readable training images, decoded
    model = create_model(parse_variant("test", depth=2, image_size=24, num_classes=3), seed=0)
    a = streamed.evaluate(model, precision="fp32")
    b = memory.evaluate(model, precision="fp32")
    assert a.pop("skipped_files", 0) == 0 and a == pytest.approx(b, rel=1e-6)
    assert streamed.splits.mean == pytest.approx(memory.splits.mean, abs=0.02)  # a sample's statistics


def test_the_data_mode(tmp_path, folder, monkeypatch):
    config = resolve_recipe("tutorial", **{**TINY, "data_mode": "auto"})
    need = (43 + 12) * 3 * 24 * 24  # bytes of the decoded folder: 43 training files (one broken), 12 test
    monkeypatch.setattr(stream, "available_memory", lambda: 4 * need)
    assert resolve_data_mode(config, folder) == "memory"  # fits in half of the memory
    monkeypatch.setattr(stream, "available_memory", lambda: need)
    assert resolve_data_mode(config, folder) == "stream"
    assert resolve_data_mode(dataclasses.replace(config, memory_share=1.0), folder) == "memory"
    assert resolve_data_mode(resolve_recipe("tutorial"), None) == "memory"  # CIFAR: always
    with pytest.raises(VitlabError, match="reads image folders"):
        resolve_data_mode(resolve_recipe("tutorial", data_mode="stream"), None)
    with pytest.raises(VitlabError, match="--train-subset needs the data in memory"):
        classify_task(resolve_recipe("tutorial", **{**TINY, "train_subset": 10}), device=torch.device("cpu"),
                      data=folder)


def test_cli_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["train", "--dataset", "folder", "--data", str(folder), "--data-mode", "sometimes"]) == 2
    assert "data_mode must be one of auto, memory, stream" in capsys.readouterr().err
    assert main(["train", "--data-mode", "stream", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "reads image folders" in capsys.readouterr().err


def test_two_processes_stream_what_one_does(tmp_path, folder, assert_same_training):
    """Crops are a function of (seed, epoch, file): whichever rank decodes an image, it gets the same pixels."""
    args = ["train", "--recipe", "tutorial", "--dataset", "folder", "--data", str(folder), "--data-mode", "stream",
            "--image-size", "24", "--workers", "1", "--epochs", "2", "--precision", "fp32", "--no-progress",
            "--crop-padding", "0", "--no-flip", "--eval-batch-size", "10", "--model", "test",
            "--model-arg", "depth=2"]
    assert main([*args, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    done = torchrun(tmp_path, *args, "--batch-size", "4", "--out", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(load_state_dict(tmp_path / "one" / "model.safetensors"),
                         load_state_dict(tmp_path / "two" / "model.safetensors"))
    one, two = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                for r in ("one", "two"))
    assert [r["test_top1"] for r in one] == [r["test_top1"] for r in two]
    assert [r["skipped_files"] for r in one] == [r["skipped_files"] for r in two]  # summed over the ranks
