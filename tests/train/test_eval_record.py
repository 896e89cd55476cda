"""eval.json says which weights it scored (sha256, training step); `vitlab eval` never writes into a run that a
live trainer holds (a real lock held by another process)."""

import hashlib
import json

import torch

from vitlab.cli import main
from vitlab.model import create_model
from vitlab.rundir import read_eval_confusion, write_preprocessor_config


def make_run(path):
    model = create_model("tutorial", seed=0, width=16, depth=1, heads=2, mlp_dim=32, image_size=16, patch_size=4,
                         num_classes=10)
    model.save_pretrained(path)
    write_preprocessor_config(path, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "step": 7 * e}) + "\n" for e in (1, 2)))
    return path


def test_eval_json_names_the_weights_and_step(tmp_path, tiny_cifar):
    run = make_run(tmp_path / "run")
    assert main(["eval", str(run), "--data", str(tiny_cifar(tmp_path / "cifar", test=20)), "--no-progress"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert record["step"] == 14  # the last metrics row: the trainer saves the weights right after writing it
    cm = read_eval_confusion(run / "eval.json", 10, notes := [])
    assert notes == [] and int(cm.sum()) == 20 and float(cm.trace()) / 20 == record["top1"]
    assert torch.equal(cm, torch.tensor(record["confusion"]))


def test_eval_refuses_a_run_held_by_a_live_trainer(tmp_path, tiny_cifar, capsys, held_run_lock):
    run = make_run(tmp_path / "run")
    data = tiny_cifar(tmp_path / "cifar", test=20)
    with held_run_lock(run) as pid:
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        assert main(["eval", str(run), "--data", str(data), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by" in err and f"pid {pid}" in err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written, nothing changed
    assert main(["eval", str(run), "--data", str(data), "--no-progress"]) == 0  # free again: evaluated
    assert (run / "eval.json").is_file()
