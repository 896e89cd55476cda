"""Checkpoints: exact round trip of optimizer/RNG state, and all-or-nothing writes under a simulated crash."""

import json

import pytest
import torch

import vitlab.weights
from vitlab.model import create_model
from vitlab.train import checkpoint as ckpt
from vitlab.train.optim import create_optimizer


def trained(seed: int = 0, steps: int = 2):
    model = create_model("seed", seed=seed, width=16, depth=1, heads=2, mlp_dim=32)
    opt = create_optimizer(model, lr=1e-2, weight_decay=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, (x, y)


def save(run_dir, model, opt, step, gen=None):
    tensors, meta = ckpt.optimizer_to_files(opt)
    gens = {"data": gen or torch.Generator().manual_seed(1)}
    ckpt.save_checkpoint(run_dir, tensors={"model": model.state_dict(), "optimizer": tensors,
                                           "rng": ckpt.rng_states(gens)},
                         state={"step": step, "optimizer": meta})


def test_round_trip_continues_identically(tmp_path):
    model, opt, (x, y) = trained()
    gen = torch.Generator().manual_seed(5)
    torch.randperm(10, generator=gen)
    save(tmp_path, model, opt, 2, gen)

    model2, opt2, _ = trained(seed=1, steps=1)  # different weights and moments, to be overwritten
    tensors, state = ckpt.load_checkpoint(tmp_path)
    model2.load_state_dict(tensors["model"])
    opt2.load_state_dict(ckpt.optimizer_from_files(tensors["optimizer"], state["optimizer"]))
    gen2 = torch.Generator()
    ckpt.restore_rng(tensors["rng"], {"data": gen2})
    assert torch.equal(torch.randperm(100, generator=gen), torch.randperm(100, generator=gen2))
    for m, o in ((model, opt), (model2, opt2)):  # one more step each: bit-identical
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def no_temp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


@pytest.mark.parametrize("crash_at", ["tensor file", "state.json", "latest.json"])
def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    before, _ = ckpt.load_checkpoint(tmp_path)
    folders = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())

    model_b, opt_b, _ = trained(steps=3)
    if crash_at == "tensor file":
        def broken_save_file(state, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"half a file")  # the temp file is half written when the power goes
            raise OSError("disk full")
        monkeypatch.setattr(vitlab.weights, "save_file", broken_save_file)
    else:
        real = ckpt.write_json

        def broken_write_json(path, obj):
            if path.name == crash_at:
                raise OSError("disk full")
            real(path, obj)
        monkeypatch.setattr(ckpt, "write_json", broken_write_json)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, model_b, opt_b, 3)

    after, state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == folders  # nothing half-written left
    assert no_temp_files(tmp_path) == []
    for k in before["model"]:
        assert torch.equal(before["model"][k], after["model"][k])


def test_new_checkpoint_replaces_old_and_pointer_is_json(tmp_path):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    save(tmp_path, model, opt, 4)
    root = tmp_path / "checkpoint"
    entries = sorted(p.name for p in root.iterdir())
    assert len(entries) == 2 and "latest.json" in entries  # the pointer and one folder
    assert json.loads((root / "latest.json").read_text())["dir"].startswith("step-000004")
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 4
    assert no_temp_files(tmp_path) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path)
