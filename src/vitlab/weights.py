"""Weight files: safetensors only (never unpickle), durable atomic writes, strict loading that explains itself.

Every file vitlab writes goes through `atomic_write`: a temp file beside the target, fsynced, renamed over
it, then the directory fsynced, so after a crash or a power loss the path holds the old or the new bytes,
never a mix, and a rename that was reported done has reached the disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitlab.errors import MissingField, VitlabError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # ".NAME.<mkstemp's 8 characters>.tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync it, rename over `path`, fsync the directory: all of the file or none."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno and e.filename is None:  # a failed write() names no file
            e.filename = str(path)
        raise
    fsync(path.parent)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents (a directory: its entries, e.g. a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data itself was synced
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files `atomic_write` leaves in `folder` when a process is killed mid-write.

    Only call it while no other process writes into `folder` (hold the run's lock): a live writer's temp
    file looks the same. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)


class JsonObject(dict):
    """A JSON object read from a file: a missing key is a one-line error naming the file and the key."""

    def __init__(self, *args, source: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source

    def __missing__(self, key):
        raise MissingField(f"{self.source}: missing field {key!r}")


def read_json(path: str | os.PathLike) -> JsonObject:
    """A file holding one JSON object; not found, not JSON, or not an object is a VitlabError naming it."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path} not found")
    try:
        obj = json.loads(path.read_text(), object_hook=lambda d: JsonObject(d, source=str(path)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise VitlabError(f"{path} must hold a JSON object {{...}}, not a {type(obj).__name__}")
    return obj


def check_json(obj: dict, source: str | os.PathLike, **fields: type | tuple[type, ...]) -> dict:
    """Check that `obj` has each field with a value of the given JSON type(s); the error names file and field.

    `check_json(state, path, step=int, optimizer=dict)`. int never accepts a bool; float accepts an int.
    """
    if not isinstance(obj, dict):
        raise VitlabError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    for name, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        if name not in obj:
            raise MissingField(f"{source}: missing field {name!r}")
        value = obj[name]
        ok = any(isinstance(value, (int, float) if t is float else t) and
                 not (isinstance(value, bool) and t in (int, float)) for t in types)
        if not ok:
            want = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
            raise VitlabError(f"{source}: field {name!r} must be {want}, got {value!r}")
    return obj


_JSON_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or Inf in any floating tensor of `state`, naming the tensors (a diverged run's weights)."""
    bad = []
    for k, v in state.items():
        if v.is_floating_point() and v.device.type != "meta":
            n = v.numel() - int(torch.isfinite(v).sum())
            if n:
                bad.append(f"{k!r} ({n} of {v.numel()} values)")
    if bad:
        more = f", ... ({len(bad)} tensors in all)" if len(bad) > 4 else ""
        raise VitlabError(f"{source}: non-finite (NaN/Inf) values in {', '.join(bad[:4])}{more}")


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file atomically; NaN/Inf weights are refused (they would replace good ones)."""
    check_finite(state, f"refusing to write {path}")
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    shared = _shared_ptrs(state)
    state = {k: v.detach().clone() if v.data_ptr() in shared else v.detach().contiguous() for k, v in state.items()}

    def write(tmp: str) -> None:
        try:
            save_file(state, tmp, metadata=metadata)
        except SafetensorError as e:  # safetensors reports a full disk as its own error: make it an OSError
            code = re.search(r"os error (\d+)", str(e))
            if not code:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None

    atomic_write(path, write)


def _shared_ptrs(state: dict[str, torch.Tensor]) -> set[int]:
    seen, shared = set(), set()
    for v in state.values():
        p = v.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file (or the model.safetensors in a directory); nothing else is accepted."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix != ".safetensors":
        raise VitlabError(f"{path}: only .safetensors weight files are loaded (pickled checkpoints can run code)")
    if not path.is_file():
        raise VitlabError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VitlabError(f"{path} is not a readable safetensors file: {e}") from None


def describe_mismatch(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """Missing keys, unexpected keys and shape mismatches between a model and a state dict, or ''."""
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                    for k in set(state) & set(model_state) if state[k].shape != model_state[k].shape)

    def fmt(label: str, items: list[str]) -> str:
        head = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        return f"{label}: {head}"

    parts = [fmt(lbl, items) for lbl, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    return "; ".join(parts)


def match_dtypes(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], *,
                 source: str = "weights") -> dict[str, torch.Tensor]:
    """`state` with each tensor in its model tensor's dtype.

    A float tensor of another float dtype (an fp16 or bf16 file for an fp32 model) is cast, with one
    warning; a change of kind (integer or bool weights for a float parameter, or the reverse) is refused:
    such a file was not written for this model, and a silent cast would give garbage predictions.
    """
    out, cast = dict(state), []
    for k, v in state.items():
        want = model_state[k].dtype if k in model_state else v.dtype
        if v.dtype == want:
            continue
        if v.is_floating_point() != want.is_floating_point or v.is_complex() or want.is_complex:
            raise VitlabError(f"{source}: tensor {k!r} is {str(v.dtype).removeprefix('torch.')} but the model "
                              f"expects {str(want).removeprefix('torch.')}; refusing to convert between kinds")
        out[k] = v.to(want)
        cast.append(f"{k} ({str(v.dtype).removeprefix('torch.')})")
    if cast:
        warnings.warn(f"{source}: cast {len(cast)} tensor(s) to the model's dtype, e.g. {cast[0]}", stacklevel=3)
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights") -> nn.Module:
    """Strictly load `state` into `model`; any difference in keys or shapes, a change of dtype kind or a
    NaN/Inf value is an error naming the tensors (float dtypes are cast, with a warning)."""
    model_state = model.state_dict()
    problem = describe_mismatch(model_state, state)
    if problem:
        raise VitlabError(f"{source} do not match the model: {problem}")
    state = match_dtypes(model_state, state, source=source)
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
    return model
