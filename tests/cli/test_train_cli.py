"""`vitlab train`, `vitlab eval`, `vitlab predict` end to end on a tiny run, and their one-line errors.

The real-CIFAR-10 run checks the numbers against plain reference code; the error paths and the resume of a
finished run use a run trained on a tiny synthetic CIFAR-10 (official binary layout), so they need no data.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.model import VisionTransformer
from vitlab.train import loop
from vitlab.train.lock import LOCK_NAME

TINY = ["--recipe", "tutorial", "--epochs", "1", "--train-subset", "256", "--test-subset", "200", "--batch-size",
        "64", "--model", "test", "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", str(cifar_dir), "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, tiny_cifar):
    """A finished tiny run on 64 random images in the official CIFAR-10 layout: no real data needed."""
    tmp = tmp_path_factory.mktemp("synthetic")
    out = tmp / "run"
    assert main(["train", "--data", str(tiny_cifar(tmp / "cifar10")), "--out", str(out), *TINY]) == 0
    return out


def one_line_error(capsys, argv, *, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err
    return err


def test_train_writes_a_complete_run_dir(run_dir):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "train_config.json",
                 "metrics.jsonl", "metrics.csv", "curves.png", "checkpoint/latest.json"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "train_config.json").read_text())
    assert record["recipe"] == "tutorial" and record["overrides"]["epochs"] == 1.0
    assert record["model"]["config"]["width"] == 16
    assert VisionTransformer.from_pretrained(run_dir).cfg.depth == 1


def test_eval_matches_a_plain_reference(run_dir, cifar_dir, capsys):
    assert main(["eval", str(run_dir), "--data", str(cifar_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "airplane" in out and "truck" in out
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["count"] == 10_000 and list(res["per_class"]) [:3] == ["airplane", "automobile", "bird"]
    assert (run_dir / "confusion.png").stat().st_size > 10_000
    # Reference: torchvision's normalisation and a plain argmax over the whole test set.
    F = pytest.importorskip("torchvision.transforms.v2.functional")
    from vitlab.data import load_cifar10

    test = load_cifar10(cifar_dir, "test")
    proc = json.loads((run_dir / "preprocessor_config.json").read_text())
    model = VisionTransformer.from_pretrained(run_dir)
    with torch.no_grad():
        x = F.normalize(test.images.float() / 255, proc["image_mean"], proc["image_std"])
        pred = torch.cat([model(x[i:i + 2000]).argmax(1) for i in range(0, 10_000, 2000)])
    assert res["top1"] == pytest.approx((pred == test.labels).float().mean().item(), abs=1e-4)
    cat = test.labels == 3
    assert res["per_class"]["cat"] == pytest.approx((pred[cat] == 3).float().mean().item(), abs=1e-4)
    assert sum(map(sum, res["confusion"])) == 10_000


def test_predict_any_image(run_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (100, 80), dtype=np.uint8), "L").save(tmp_path / "g.jpg")
    assert main(["predict", str(run_dir), str(tmp_path / "a.png"), str(tmp_path / "g.jpg"), "--top-k", "3",
                 "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["image"] for p in lines] == [str(tmp_path / "a.png"), str(tmp_path / "g.jpg")]
    classes = VisionTransformer.read_class_names(run_dir)
    for p in lines:
        assert len(p["labels"]) == 3 and set(p["labels"]) <= set(classes)
        assert p["probs"] == sorted(p["probs"], reverse=True) and 0 < sum(p["probs"]) <= 1 + 1e-6
    assert main(["predict", str(run_dir), str(tmp_path / "g.jpg")]) == 0  # the human-readable form
    assert len(capsys.readouterr().out.splitlines()) == 1 + 5


def snapshot(run_dir):
    """Every file of the run dir (checkpoint included; not the lock every start takes) -> (bytes, mtime in ns)."""
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and p.name != LOCK_NAME}


def test_resume_of_a_finished_run_is_a_no_op(synthetic_run, capsys, monkeypatch):
    capsys.readouterr()
    before = snapshot(synthetic_run)
    final = json.loads((synthetic_run / "metrics.jsonl").read_text().splitlines()[-1])

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    for name in ("run_epoch", "train_step", "end_epoch", "save"):
        monkeypatch.setattr(loop.Trainer, name, no_training)
    monkeypatch.setattr(loop, "write_run_files", no_training)
    assert main(["train", "--resume", str(synthetic_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is already complete" in out and f"test top-1 {final['test_top1']:.2%}" in out
    assert snapshot(synthetic_run) == before  # weights, checkpoint, metrics: same bytes, not even rewritten


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, tiny_cifar):
    """Errors found before any data is read, or in the data itself: no real CIFAR needed."""
    one_line_error(capsys, ["train", "--recipe", "nope"], match="unknown recipe 'nope'")
    one_line_error(capsys, ["train", "--model", "Zz/4", "--out", str(tmp_path / "x")], match="unknown model variant")
    one_line_error(capsys, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y"), *TINY],
                   match="no CIFAR-10 data")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("data_batch_1.bin", "test_batch.bin"):
        (corrupt / name).write_bytes(b"\x00" * 1000)
    (corrupt / "batches.meta.txt").write_text("\n".join("abcdefghij"))
    one_line_error(capsys, ["train", "--data", str(corrupt), "--out", str(tmp_path / "z"), *TINY],
                   match="data_batch")
    truncated = tiny_cifar(tmp_path / "truncated")
    (truncated / "data_batch_3.bin").write_bytes((truncated / "data_batch_3.bin").read_bytes()[:-100])
    one_line_error(capsys, ["train", "--data", str(truncated), "--out", str(tmp_path / "t"), *TINY],
                   match="data_batch_3.bin")
    one_line_error(capsys, ["train", "--resume", str(tmp_path / "nothing")], match="nothing")
    one_line_error(capsys, ["eval", str(tmp_path / "nothing")], match="not found")
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "t"))  # no half-made run dirs


def test_bad_inputs_on_a_run_exit_2_with_one_line(synthetic_run, tmp_path, capsys):
    run = synthetic_run
    one_line_error(capsys, ["train", "--out", str(run), *TINY], match="already holds a run")
    one_line_error(capsys, ["train", "--resume", str(run), "--epochs", "5"], match="drop --epochs")
    one_line_error(capsys, ["eval", str(run), "--data", str(tmp_path / "missing")], match="no CIFAR-10 data")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    one_line_error(capsys, ["predict", str(run), str(tmp_path / "junk.jpg")], match="cannot read image")
    one_line_error(capsys, ["predict", str(run), str(tmp_path / "missing.png")], match="not found")
    broken = tmp_path / "broken-run"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((run / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    one_line_error(capsys, ["predict", str(broken), str(tmp_path / "junk.jpg")], match="safetensors")
