"""Weight and JSON files: durable atomic writes, disk-full errors that name the file, validation on read."""

import errno
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab.weights as W
from vitlab.errors import MissingField, VitlabError
from vitlab.model import create_model


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture()
def events(monkeypatch):
    """Record fsync (by path) and rename calls in order, to check what reaches the disk when."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append(("fsync", fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    return log


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_directory(tmp_path, events):
    target = tmp_path / "sub" / "x.json"
    W.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    (_, tmp), (op, src, dst), last = events[0], events[1], events[2]
    assert op == "replace" and src == tmp and dst == str(target)  # the temp file was synced before the rename
    assert os.path.basename(tmp).startswith(".x.json.") and tmp.endswith(".tmp")
    assert last == ("fsync", str(target.parent))  # and the directory entry after it
    assert len(events) == 3


def test_failed_write_keeps_old_file_names_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    W.write_json(target, {"v": 1})

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file name

    with pytest.raises(OSError) as info:
        W.atomic_write(target, full_disk)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_safetensors_disk_full_becomes_an_oserror_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(state, path, metadata=None):  # the message safetensors gives on ENOSPC (seen on a full tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(W, "save_file", full)
    with pytest.raises(OSError) as info:
        W.save_state_dict({"w": torch.ones(3)}, tmp_path / "m.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_onto_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        W.write_json(tmp_path / "d", {})
    assert info.value.filename == str(tmp_path / "d")


def test_remove_temp_files_removes_only_atomic_write_leftovers(tmp_path, monkeypatch):
    def killed(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # stands in for the moment of a kill: the temp file is still on disk

    monkeypatch.setattr(os, "unlink", lambda p: None)  # as if the process died before its cleanup
    with pytest.raises(KeyboardInterrupt):
        W.atomic_write(tmp_path / "model.safetensors", killed)
    monkeypatch.undo()
    for name in ("keep.tmp", ".hidden", "model.safetensors.tmp", "notes.txt"):
        (tmp_path / name).write_text("user file")
    removed = W.remove_temp_files(tmp_path)
    assert len(removed) == 1 and removed[0].name.startswith(".model.safetensors.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.tmp", "model.safetensors.tmp", "notes.txt"]


def test_read_json_wants_an_object_and_names_missing_fields(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(VitlabError, match=r"list.json must hold a JSON object"):
        W.read_json(tmp_path / "list.json")
    (tmp_path / "obj.json").write_text('{"a": {"b": 1}}')
    d = W.read_json(tmp_path / "obj.json")
    with pytest.raises(MissingField, match=r"obj.json: missing field 'z'"):
        d["z"]
    with pytest.raises(KeyError):  # still a KeyError for code that catches one
        d["a"]["c"]
    assert d.get("z") is None and json.loads(json.dumps(d)) == {"a": {"b": 1}}


def test_check_json_names_file_and_field(tmp_path):
    with pytest.raises(VitlabError, match=r"f.json: field 'step' must be an integer, got True"):
        W.check_json({"step": True}, "f.json", step=int)
    with pytest.raises(VitlabError, match=r"field 'dir' must be a string, got 3"):
        W.check_json({"dir": 3}, "f.json", dir=str)
    with pytest.raises(MissingField, match=r"missing field 'dir'"):
        W.check_json({}, "f.json", dir=str)
    assert W.check_json({"x": 1}, "f.json", x=float) == {"x": 1}


def tiny():
    return create_model("test", seed=0)


def test_nan_weights_are_refused_on_save_and_on_load(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        model.head.bias[1] = float("inf")
    with pytest.raises(VitlabError, match=r"'blocks.0.mlp.fc1.weight' \(1 of 512 values\)"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == good  # the good weights stay
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")  # written by something else
    with pytest.raises(VitlabError, match=r"non-finite.*'blocks.0.mlp.fc1.weight'.*'head.bias'"):
        type(model).from_pretrained(tmp_path)


def test_float_dtypes_are_cast_with_a_warning_other_kinds_refused(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="cast .* tensor"):
        loaded = type(model).from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].half().float()), k
    save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(VitlabError, match="is int32 but the model expects float32"):
            type(model).from_pretrained(tmp_path)
