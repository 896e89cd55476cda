"""`vitlab export` writes only where it may: never over a run dir (locked or not), never beside files it did not
write, replaces an earlier export only with --force, and leaves nothing that looks like a model when it fails."""

from __future__ import annotations

import json

import pytest

from vitlab.cli import main


def snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def refused(capsys, args, words):
    assert main(["export", *args, "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlab export: error:") and words in err and "\n" not in err


def no_leftovers(parent):
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and "export" in p.name]


def test_a_run_dir_is_never_a_target(vit_dir, tmp_path, capsys):
    src, run = vit_dir(), vit_dir("other_run")
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = snapshot(run)
    refused(capsys, [str(src), str(run), "--to", "hf", "--force"], "is a vitlab run dir")
    assert snapshot(run) == before
    no_leftovers(tmp_path)


def test_a_dir_locked_by_a_live_trainer_is_refused(vit_dir, tmp_path, capsys, held_run_lock):
    src, target = vit_dir(), tmp_path / "training"
    with held_run_lock(target):
        before = snapshot(target)
        refused(capsys, [str(src), str(target), "--to", "onnx"], ".vitlab-lock")
        assert snapshot(target) == before


def test_files_it_did_not_write_are_never_overwritten(vit_dir, tmp_path, capsys):
    """An older model.safetensors: a fresh config.json beside it would look like a model and load junk."""
    src, target = vit_dir(), tmp_path / "target"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"older weights")
    refused(capsys, [str(src), str(target), "--to", "timm", "--force"], "not a vitlab export (model.safetensors)")
    assert snapshot(target) == {"model.safetensors": b"older weights"}


def test_an_earlier_export_is_replaced_only_with_force_and_only_its_own_files(vit_dir, tmp_path, capsys):
    src, out = vit_dir(), tmp_path / "out"
    assert main(["export", str(src), str(out), "--to", "timm", "--no-check"]) == 0
    record = json.loads((out / "vitlab_export.json").read_text())
    assert record["format"] == "timm" and record["files"] == ["config.json", "model.safetensors"]
    (out / "NOTES.txt").write_text("mine")
    capsys.readouterr()
    refused(capsys, [str(src), str(out), "--to", "timm"], "--force replaces it")
    refused(capsys, [str(src), str(out), "--to", "hf", "--force"], "holds an earlier timm export, not hf")
    (out / "model.safetensors").write_bytes(b"stale")  # the earlier export's file: --force replaces it
    assert main(["export", str(vit_dir("run2", num_classes=3)), str(out), "--to", "timm", "--force"]) == 0
    assert (out / "NOTES.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    assert (out / "model.safetensors").read_bytes() != b"stale"
    no_leftovers(tmp_path)


def test_a_failed_export_leaves_nothing_that_looks_like_a_model(vit_dir, tmp_path, capsys):
    refused(capsys, [str(vit_dir("registers", reg_tokens=1)), str(tmp_path / "hf"), "--to", "hf"], "register")
    assert not (tmp_path / "hf").exists()
    no_leftovers(tmp_path)


def test_an_empty_dir_is_a_fine_target(vit_dir, tmp_path):
    pytest.importorskip("onnxscript")
    (tmp_path / "empty").mkdir()
    assert main(["export", str(vit_dir()), str(tmp_path / "empty"), "--to", "onnx", "--no-check"]) == 0
    assert {"model.onnx", "config.json", "vitlab_export.json"} <= {p.name for p in (tmp_path / "empty").iterdir()}
    no_leftovers(tmp_path)
