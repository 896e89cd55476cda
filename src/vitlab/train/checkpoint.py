"""Training checkpoints that survive a crash at any moment, and resume bit-exactly.

Layout inside the run dir:

    checkpoint/latest.json           {"dir": "step-000390-x1y2"}  <- written last, atomically: the commit point
    checkpoint/step-000390-x1y2/     (a fresh folder per save)
        model.safetensors            raw training weights (the run dir's model.safetensors may be the EMA)
        ema.safetensors              EMA weights, when on
        optimizer.safetensors        AdamW moments and step counts, keyed "state.<param index>.<name>"
        rng.safetensors              torch generator states (global CPU/CUDA, data order, augmentation)
        state.json                   epoch, step, schedule, optimizer param_groups, EMA updates, elapsed time

A new checkpoint goes to a fresh `step-*` folder; only after every file is complete does `latest.json` move
to it, and only then are older folders deleted. A crash while writing leaves `latest.json` on the previous,
complete checkpoint. Tensors are safetensors and the rest JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.weights import load_state_dict, read_json, save_state_dict, write_json

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"
STATE = "state.json"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer.state_dict() split into flat tensors ("state.<idx>.<key>") and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_files`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: str | Path, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write `tensors` (file stem -> state dict) and `state` (JSON) as one all-or-nothing checkpoint."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"step-{int(state['step']):06d}-", dir=root))  # never reused
    name = folder.name
    try:
        for stem, sd in tensors.items():
            save_state_dict(sd, folder / f"{stem}.safetensors")
        write_json(folder / STATE, state)
        write_json(root / LATEST, {"dir": name})  # the commit point
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for old in root.iterdir():  # everything but the committed checkpoint and the pointer
        if old.name not in (name, LATEST):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return folder


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / LATEST).is_file()


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(file stem -> tensors, state) of the last committed checkpoint."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not (root / LATEST).is_file():
        raise VitlabError(f"{run_dir} has no checkpoint to resume from ({root / LATEST} not found)")
    folder = root / str(read_json(root / LATEST).get("dir", ""))
    if not folder.is_dir() or folder.parent != root:
        raise VitlabError(f"{root / LATEST} points to a missing checkpoint folder {folder.name!r}")
    tensors = {p.stem: load_state_dict(p) for p in sorted(folder.glob("*.safetensors"))}
    return tensors, read_json(folder / STATE)


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The global torch RNG (dropout, drop-path), CUDA's if in use, and the named generators."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    out.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
    return out


def restore_rng(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    for k, g in generators.items():
        if f"gen.{k}" not in states:
            raise VitlabError(f"checkpoint has no state for the {k!r} random generator")
        g.set_state(states[f"gen.{k}"])
