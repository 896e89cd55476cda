"""Weight files: safetensors only (never unpickle), atomic writes, strict loading that explains itself."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitlab.errors import VitlabError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlabError(f"{path} is not valid JSON: {e}") from None


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    shared = _shared_ptrs(state)
    state = {k: v.detach().clone() if v.data_ptr() in shared else v.detach().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights") -> nn.Module:
    """Strictly load `state` into `model`; any difference is an error listing every problem."""
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise VitlabError(f"{source} do not match the model: {problem}")
    model.load_state_dict(state, strict=True)
    return model
