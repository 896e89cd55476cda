"""Checkpoints: exact round trip of optimizer/RNG state, and all-or-nothing writes under a simulated crash."""

import json

import pytest
import torch

import vitlab.weights
from vitlab.model import create_model
from vitlab.train import checkpoint as ckpt
from vitlab.train.optim import create_optimizer


def trained(seed: int = 0, steps: int = 2):
    model = create_model("test", seed=seed)
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


# ---- durability -------------------------------------------------------------------------------------------
def test_previous_checkpoint_survives_until_the_new_one_is_on_disk(tmp_path, monkeypatch):
    """The old folder is deleted only after latest.json (pointing at the complete new one) is fsynced."""
    import os

    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    root = tmp_path / "checkpoint"
    old = next(p for p in root.iterdir() if p.is_dir())
    log = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        log.append((path, old.is_dir()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save(tmp_path, model, opt, 4)
    new = next(p for p in root.iterdir() if p.is_dir())
    synced = [p for p, _ in log]
    for name in ("model", "optimizer", "rng"):  # every file, and the new folder's entry in checkpoint/
        assert any(os.path.basename(p).startswith(f".{name}.safetensors.") for p in synced), name
    latest_tmp = max(i for i, p in enumerate(synced) if os.path.basename(p).startswith(".latest.json."))
    assert synced.index(str(root)) < latest_tmp  # the folder entry reached the disk before the pointer
    assert synced[-1] == str(root) and all(alive for _, alive in log)  # old folder alive until the last fsync
    assert not old.exists() and new.name.startswith("step-000004")


def test_a_failed_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fails syncing the directory after latest.json's rename: the old checkpoint must still be there."""
    import os

    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    real_fsync, real_replace, renamed = os.fsync, os.replace, []

    def replace(a, b):
        real_replace(a, b)
        renamed.append(os.path.basename(b))

    def fsync(fd):
        if renamed and renamed[-1] == "latest.json":
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        save(tmp_path, model, opt, 4)
    monkeypatch.undo()
    folders = [p.name for p in (tmp_path / "checkpoint").iterdir() if p.is_dir()]
    assert any(f.startswith("step-000002") for f in folders)  # not deleted: the new one may not be on disk
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 4  # and latest.json's folder was not deleted either


def test_nan_weights_never_become_a_checkpoint(tmp_path):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    before = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"refusing to checkpoint step 3: model.*'blocks.0.attn.qkv.weight'"):
        save(tmp_path, model, opt, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == before
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 2


def test_clean_stale_removes_what_killed_runs_leave(tmp_path):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    root = tmp_path / "checkpoint"
    committed = next(p for p in root.iterdir() if p.is_dir())
    (root / "step-000003-killed").mkdir()  # a save killed before its commit
    (root / "step-000003-killed" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.json.abcd1234.tmp").write_text("{")
    (tmp_path / ".model.safetensors.k9x2_a7b.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    removed = {p.name for p in ckpt.clean_stale(tmp_path)}
    assert removed == {"step-000003-killed", ".latest.json.abcd1234.tmp", ".model.safetensors.k9x2_a7b.tmp"}
    assert sorted(p.name for p in root.iterdir()) == sorted([committed.name, "latest.json"])
    assert (tmp_path / "notes.txt").exists() and ckpt.load_checkpoint(tmp_path)[1]["step"] == 2


def test_clean_stale_touches_nothing_behind_an_unreadable_pointer(tmp_path):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    root = tmp_path / "checkpoint"
    (root / "latest.json").write_text("{not json")
    before = sorted(p.name for p in root.iterdir())
    assert ckpt.clean_stale(tmp_path) == []
    assert sorted(p.name for p in root.iterdir()) == before


# ---- everything read back is checked ----------------------------------------------------------------------
def rewrite(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("latest, words", [
    ("[1]", "must hold a JSON object"),
    ('{"dir": 3}', "field 'dir' must be a string"),
    ('{"dirr": "x"}', "missing field 'dir'"),
    ('{"dir": "../../etc"}', "points outside"),
    ('{"dir": "/etc"}', "points outside"),
    ('{"dir": "step-9"}', "missing checkpoint folder"),
])
def test_malformed_latest_json(tmp_path, latest, words):
    model, opt, _ = trained()
    save(tmp_path, model, opt, 2)
    (tmp_path / "checkpoint" / "latest.json").write_text(latest)
    with pytest.raises(ValueError, match=words) as info:
        ckpt.load_checkpoint(tmp_path)
    assert "latest.json" in str(info.value)


def test_latest_json_cannot_escape_through_a_symlink(tmp_path):
    model, opt, _ = trained()
    save(tmp_path / "other", model, opt, 2)  # a real checkpoint folder elsewhere
    save(tmp_path / "run", model, opt, 2)
    outside = next(p for p in (tmp_path / "other" / "checkpoint").iterdir() if p.is_dir())
    (tmp_path / "run" / "checkpoint" / "link").symlink_to(outside)
    (tmp_path / "run" / "checkpoint" / "latest.json").write_text('{"dir": "link"}')
    with pytest.raises(ValueError, match="points outside"):
        ckpt.load_checkpoint(tmp_path / "run")


def test_a_file_latest_json_lists_must_be_there(tmp_path):
    model, opt, _ = trained()
    folder = save_folder(tmp_path, model, opt, 2)
    (folder / "rng.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rng.safetensors is missing \(latest.json lists it\)"):
        ckpt.load_checkpoint(tmp_path)


def save_folder(run_dir, model, opt, step):
    save(run_dir, model, opt, step)
    return next(p for p in (run_dir / "checkpoint").iterdir() if p.is_dir())


@pytest.mark.parametrize("changes, words", [
    ({"step": -1}, "'step' must be a non-negative integer"),
    ({"step": "2"}, "'step' must be an integer"),
    ({"step": 2.5}, "'step' must be an integer"),
    ({"epoch": -3}, "'epoch' must be a non-negative integer"),
    ({"step": 900, "total_steps": 10}, "past 'total_steps'"),
    ({"elapsed_s": float("nan")}, "'elapsed_s' must be a finite number"),
    ({"finished": "yes"}, "'finished' must be true or false"),
    ({"optimizer": [1]}, "'optimizer' must be an object"),
])
def test_malformed_state_json(tmp_path, changes, words):
    model, opt, _ = trained()
    folder = save_folder(tmp_path, model, opt, 2)
    rewrite(folder / "state.json", **changes)
    with pytest.raises(ValueError, match=words) as info:
        ckpt.load_checkpoint(tmp_path)
    assert "state.json" in str(info.value)


def test_missing_state_field_or_file_names_it(tmp_path):
    model, opt, _ = trained()
    folder = save_folder(tmp_path, model, opt, 2)
    tensors, state = ckpt.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"state.json: missing field 'schedule'"):
        state["schedule"]
    with pytest.raises(ValueError, match=rf"{folder.name}: no ema.safetensors"):
        tensors["ema"]


def test_non_finite_checkpoint_tensors_are_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model, opt, _ = trained()
    folder = save_folder(tmp_path, model, opt, 2)
    moments = load_file(folder / "optimizer.safetensors")
    moments["state.0.exp_avg"][0] = float("inf")
    save_file(moments, folder / "optimizer.safetensors")
    with pytest.raises(ValueError, match=r"optimizer.safetensors: non-finite.*'state.0.exp_avg'"):
        ckpt.load_checkpoint(tmp_path)


def restore_into_fresh(tmp_path):
    tensors, state = ckpt.load_checkpoint(tmp_path)
    model2, opt2, _ = trained(seed=1, steps=1)
    ckpt.restore_optimizer(opt2, tensors["optimizer"], state["optimizer"], source="ckpt")
    return model2, opt2


def test_restore_optimizer_round_trip_is_exact(tmp_path):
    model, opt, (x, y) = trained()
    save(tmp_path, model, opt, 2)
    _, opt2 = restore_into_fresh(tmp_path)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][idx][k]), (idx, k)


def test_restore_optimizer_takes_moments_of_a_scalar_parameter():
    """A 0-d parameter (CLIP's logit scale) has 0-d moments: they are moments, not step counts."""
    scale = torch.nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.AdamW([scale], lr=0.1)
    (-scale).backward()  # a negative gradient: exp_avg < 0
    opt.step()
    tensors, meta = ckpt.optimizer_to_files(opt)
    assert float(tensors["state.0.exp_avg"]) < 0
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.tensor(0.0))], lr=0.1)
    ckpt.restore_optimizer(opt2, tensors, json.loads(json.dumps(meta)), source="ckpt")
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], tensors["state.0.exp_avg"])
    tensors["state.0.exp_avg"] = tensors["state.0.exp_avg"].double()
    with pytest.raises(ValueError, match="state.0.exp_avg is float64"):
        ckpt.restore_optimizer(opt2, tensors, json.loads(json.dumps(meta)), source="ckpt")


@pytest.mark.parametrize("corrupt, words", [
    (lambda t, m: t.update({"state.0.exp_avg": t["state.0.exp_avg"][:1]}), r"state.0.exp_avg is float32 \(1,"),
    (lambda t, m: t.update({"state.0.exp_avg": t["state.0.exp_avg"].double()}), "state.0.exp_avg is float64"),
    (lambda t, m: t.update({"state.0.step": torch.tensor(-4.0)}), "state.0.step must be a finite count"),
    (lambda t, m: t.update({"bogus": torch.zeros(1)}), "'bogus' is not named state"),
    (lambda t, m: t.update({"state.999.exp_avg": torch.zeros(1)}), "parameter 999, which no parameter group"),
    (lambda t, m: m["param_groups"].append(dict(m["param_groups"][0])), r"\d parameter groups, this model's has \d"),
    (lambda t, m: m["param_groups"][0].update(lr="fast"), r"param_groups\[0\].lr is 'fast'"),
    (lambda t, m: m["param_groups"][0].update(betas=[0.9]), r"param_groups\[0\].betas"),
    (lambda t, m: m["param_groups"][0].update(params=m["param_groups"][0]["params"][:-1]), "holds"),
    (lambda t, m: m.pop("param_groups"), "missing field 'param_groups'"),
])
def test_restore_optimizer_refuses_mismatched_state(tmp_path, corrupt, words):
    model, opt, _ = trained()
    tensors, meta = ckpt.optimizer_to_files(opt)
    meta = json.loads(json.dumps(meta))  # as read back from state.json
    corrupt(tensors, meta)
    _, opt2, _ = trained(seed=1, steps=1)
    with pytest.raises(ValueError, match=words):
        ckpt.restore_optimizer(opt2, tensors, meta, source="ckpt")


@pytest.mark.parametrize("corrupt, words", [
    (lambda s: s.pop("gen.data"), "no state for the 'data' random generator"),
    (lambda s: s.update({"torch": s["torch"][:100]}), r"'torch' is uint8 \(100,\), expected uint8 \(5056,\)"),
    (lambda s: s.update({"gen.data": s["gen.data"].float()}), "'gen.data' is float32"),
    (lambda s: s.update({"gen.data": torch.full_like(s["gen.data"], 255)}), "state is invalid"),
])
def test_restore_rng_refuses_wrong_states(corrupt, words):
    gens = {"data": torch.Generator().manual_seed(1)}
    states = ckpt.rng_states(gens)
    corrupt(states)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=words):
        ckpt.restore_rng(states, {"data": torch.Generator()})
    torch.set_rng_state(before)
