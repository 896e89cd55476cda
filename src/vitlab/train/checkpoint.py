"""Training checkpoints that survive a crash or a power loss at any moment, and resume bit-exactly.

Layout inside the run dir:

    checkpoint/latest.json           {"dir": "step-000390-x1y2", "files": [...]}  <- written last: the commit point
    checkpoint/step-000390-x1y2/     (a fresh folder per save)
        model.safetensors            raw training weights (the run dir's model.safetensors may be the EMA)
        ema.safetensors              EMA weights, when on
        optimizer.safetensors        AdamW moments and step counts, keyed "state.<param index>.<name>"
        rng.safetensors              torch generator states (global CPU/CUDA, data order, augmentation)
        state.json                   epoch, step, schedule, optimizer param_groups, EMA updates, elapsed time

A new checkpoint goes to a fresh `step-*` folder; every file is fsynced, then the folder's entry, and only
then does `latest.json` (fsynced too) move to it; older folders are deleted after that. A crash or power
loss leaves `latest.json` on the previous, complete checkpoint, which is never deleted before the new one
is on disk. Weights with NaN/Inf are refused, so a diverged run cannot replace its last good checkpoint.
Tensors are safetensors and the rest JSON: nothing is unpickled on resume, and everything read back is
checked (JSON shape, counters, tensor dtypes and shapes against the model, optimizer and generators, the
folder named by latest.json inside checkpoint/) with errors naming the file and the field.
Only one process may write a run dir at a time: `vitlab.train.lock.RunLock`.
"""

from __future__ import annotations

import json
import math
import numbers
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vitlab.errors import MissingField, VitlabError, check_count, check_fields, check_number
from vitlab.train.distributed import get_rank, get_world_size, is_main
from vitlab.weights import (
    check_finite,
    check_json,
    fsync,
    load_state_dict,
    read_json,
    remove_temp_files,
    save_state_dict,
    write_json,
)

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"
STATE = "state.json"
COUNTERS = ("step", "epoch", "total_steps", "ema_updates")  # non-negative integers when present
SCRATCH_PREFIX = ".budget-probe-"  # scratch folders the trainer saves into to time a save (run dir level)


class CheckpointFiles(dict):
    """file stem -> tensors of one checkpoint; a missing file is a one-line error naming the folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, stem: str):
        raise MissingField(f"{self.folder}: no {stem}.safetensors in this checkpoint")


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


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, *, source: str = "checkpoint") -> dict:
    """Inverse of `optimizer_to_files`: a state dict for `optimizer.load_state_dict` (names checked)."""
    check_json(meta, source, param_groups=list)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise VitlabError(f"{source}: optimizer tensor {name!r} is not named state.<index>.<name>")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict):
        raise VitlabError(f"{source}: optimizer field 'scalars' must be an object, got {scalars!r}")
    for name, value in scalars.items():
        idx, _, key = name.partition(".")
        if not idx.isdigit() or not key:
            raise VitlabError(f"{source}: optimizer scalar {name!r} is not named <index>.<name>")
        state.setdefault(int(idx), {})[key] = value
    groups = []
    for i, g in enumerate(meta["param_groups"]):
        check_json(g, f"{source} optimizer param_groups[{i}]", params=list)
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in g["params"]):
            raise VitlabError(f"{source}: optimizer param_groups[{i}].params must be non-negative integers")
        groups.append({k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, *,
                      source: str = "checkpoint") -> None:
    """Load a checkpoint's optimizer state after checking it against `optimizer`: the same parameter groups
    and hyperparameter types, moments of each parameter's shape and dtype, finite step counts."""
    sd = optimizer_from_files(tensors, meta, source=source)
    current = optimizer.state_dict()["param_groups"]
    groups = sd["param_groups"]
    if len(groups) != len(current):
        raise VitlabError(f"{source}: optimizer has {len(groups)} parameter groups, this model's has {len(current)}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, (saved, now) in enumerate(zip(groups, current)):
        if len(saved["params"]) != len(now["params"]):
            raise VitlabError(f"{source}: optimizer param_groups[{i}] holds {len(saved['params'])} parameters, "
                              f"this model's {len(now['params'])}")
        for key, value in now.items():
            if key != "params" and not _same_kind(saved.get(key, MissingField), value):
                raise VitlabError(f"{source}: optimizer param_groups[{i}].{key} is {saved.get(key, 'missing')!r}, "
                                  f"expected a value like {value!r}")
    index = {pid: params[j] for j, pid in enumerate(pid for g in groups for pid in g["params"])}
    for idx, st in sd["state"].items():
        if idx not in index:
            raise VitlabError(f"{source}: optimizer state for parameter {idx}, which no parameter group holds")
        p = index[idx]
        for key, v in st.items():
            name = f"optimizer state.{idx}.{key}"
            if isinstance(v, torch.Tensor) and v.dim() == 0 and (key == "step" or p.dim() > 0):  # a step count
                if v.is_complex() or not math.isfinite(float(v)) or float(v) < 0:
                    raise VitlabError(f"{source}: {name} must be a finite count >= 0, got {v.item()!r}")
            elif isinstance(v, torch.Tensor):
                if v.shape != p.shape or v.dtype != p.dtype:
                    raise VitlabError(f"{source}: {name} is {_dtype(v)} {tuple(v.shape)}, the parameter is "
                                      f"{_dtype(p)} {tuple(p.shape)}")
                check_finite({name: v}, source)
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                check_number(v, name, source, minimum=0)
    optimizer.load_state_dict(sd)


def _same_kind(saved, current) -> bool:
    """A saved hyperparameter can stand in for the current one (number for number, pair for pair, ...)."""
    if saved is MissingField:
        return False
    if current is None or saved is None:
        return current is None or saved is None or isinstance(saved, (bool, str))
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, numbers.Real):
        return isinstance(saved, numbers.Real) and not isinstance(saved, bool) and saved == saved
    if isinstance(current, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(current) and \
            all(_same_kind(s, c) for s, c in zip(saved, current))
    if isinstance(current, torch.Tensor):
        return isinstance(saved, (torch.Tensor, numbers.Real))
    return isinstance(saved, type(current))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def save_checkpoint(run_dir: str | Path, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write `tensors` (file stem -> state dict) and `state` (JSON) as one durable all-or-nothing checkpoint.

    Refuses NaN/Inf tensors before touching the disk (VitlabError naming the tensor), so a diverged run
    keeps its last good checkpoint.
    """
    step = check_count(state.get("step"), "step", "checkpoint state")
    for stem, sd in tensors.items():
        check_finite(sd, f"refusing to checkpoint step {step}: {stem}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"step-{step:06d}-", dir=root))  # never reused
    name = folder.name
    try:
        for stem, sd in tensors.items():
            save_state_dict(sd, folder / f"{stem}.safetensors")
        write_json(folder / STATE, state)
        fsync(root)  # the new folder's entry is on disk before anything points at it
        write_json(root / LATEST, {"dir": name, "files": sorted(tensors)})  # the commit point, fsynced
    except BaseException:
        if _committed_name(root) != name:  # failed after latest.json's rename (its fsync): keep what it names
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for old in root.iterdir():  # only now: everything but the committed checkpoint and the pointer
        if old.name not in (name, LATEST):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return folder


def _committed_name(root: Path) -> str | None:
    try:
        return json.loads((root / LATEST).read_text()).get("dir")
    except (OSError, ValueError, AttributeError):
        return None


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / LATEST).is_file()


def committed_folder(run_dir: str | Path) -> tuple[Path, list[str] | None]:
    """(the folder latest.json commits, the file stems it lists or None for older checkpoints), checked."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not (root / LATEST).is_file():
        raise VitlabError(f"{run_dir} has no checkpoint to resume from ({root / LATEST} not found)")
    latest = check_json(read_json(root / LATEST), root / LATEST, dir=str)
    folder = (root / latest["dir"]).resolve()
    if folder.parent != root.resolve():
        raise VitlabError(f"{root / LATEST}: field 'dir' ({latest['dir']!r}) points outside {root}")
    if not folder.is_dir():
        raise VitlabError(f"{root / LATEST} points to a missing checkpoint folder {latest['dir']!r}")
    files = latest.get("files")
    if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise VitlabError(f"{root / LATEST}: field 'files' must be a list of names, got {files!r}")
    return folder, files


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(file stem -> tensors, state) of the last committed checkpoint, every part checked as it is read."""
    folder, files = committed_folder(run_dir)
    for stem in files or ():
        if not (folder / f"{stem}.safetensors").is_file():
            raise VitlabError(f"{folder}: {stem}.safetensors is missing (latest.json lists it)")
    tensors = CheckpointFiles(folder)
    for p in sorted(folder.glob("*.safetensors")):
        tensors[p.stem] = load_state_dict(p)
        check_finite(tensors[p.stem], str(p))
    return tensors, check_state(read_json(folder / STATE), folder / STATE)


def check_state(state: dict, source: str | Path) -> dict:
    """state.json's fields the trainer relies on: counters are non-negative integers and consistent."""
    check_json(state, source, step=int)
    for name in COUNTERS:
        if name in state:
            check_count(state[name], name, str(source))
    if "total_steps" in state and state["step"] > state["total_steps"]:
        raise VitlabError(f"{source}: field 'step' ({state['step']}) is past 'total_steps' ({state['total_steps']})")
    if "elapsed_s" in state:
        check_number(state["elapsed_s"], "elapsed_s", str(source), minimum=0)
    for name, kind in (("finished", bool), ("optimizer", dict), ("schedule", dict), ("budget", (dict, type(None))),
                       ("guard", dict)):
        if name in state:
            check_json(state, source, **{name: kind})
    if state.get("budget"):
        budget = state["budget"]
        check_number(budget.get("step_s", 0.0), "budget.step_s", str(source), minimum=0)
        ends = budget.get("epoch_ends", [])
        if not isinstance(ends, list):
            raise VitlabError(f"{source}: field 'budget.epoch_ends' must be a list of seconds, got {ends!r}")
        for s in ends:
            check_number(s, "budget.epoch_ends", str(source), minimum=0)
    return state


def check_schedule(d: dict, source: str | Path) -> dict:
    """state.json's "schedule": the fields of `WarmupCosine`, of their types, with counts >= 0 and rates > 0."""
    from vitlab.train.optim import WarmupCosine

    check_fields(WarmupCosine, d, "schedule")
    check_json(d, source, base_lr=float, total_steps=int)
    where = f"{source} schedule"
    check_number(d["base_lr"], "base_lr", where, minimum=0)
    check_number(d.get("min_lr", 0.0), "min_lr", where, minimum=0)
    check_count(d["total_steps"], "total_steps", where)
    check_count(d.get("warmup_steps", 0), "warmup_steps", where)
    return d


def check_total_steps(state: dict, planned: int, *, timed: bool, source: str | Path) -> int:
    """state.json's end of the run: the plan's (train_config.json), unless a time budget moved it; the
    schedule ends there too. A forged counter cannot make a run go on for ever."""
    total = state["total_steps"]
    if not timed and total != planned:
        raise VitlabError(f"{source}: field 'total_steps' ({total}) is not the {planned} steps the run's plan has")
    if state["schedule"]["total_steps"] != max(total, 1):
        raise VitlabError(f"{source}: field 'schedule.total_steps' ({state['schedule']['total_steps']}) is not "
                          f"'total_steps' ({total})")
    return total


def check_record(record: dict, source: str | Path) -> dict:
    """What resuming reads from train_config.json besides the config: the task kind, the plan, the data."""
    check_json(record, source, config=dict)
    for name, kind in (("task", str), ("plan", dict), ("data", dict)):
        if name in record:
            check_json(record, source, **{name: kind})
    plan = record.get("plan")
    if plan is not None:
        where = f"{source} plan"
        check_json(plan, where, total_steps=int, warmup_steps=int)
        check_count(plan["total_steps"], "total_steps", where)
        check_count(plan["warmup_steps"], "warmup_steps", where)
        if "precision" in plan:
            check_json(plan, where, precision=(str, type(None)))
        for name in ("step_s", "epoch_end_s", "exit_s"):
            if name in plan:
                check_number(plan[name], name, where, minimum=0)
    root = record.get("data", {}).get("root")
    if root is not None and not isinstance(root, str):
        raise VitlabError(f"{source}: field 'data.root' must be a path, got {root!r}")
    return record


def clean_stale(run_dir: str | Path) -> list[Path]:
    """Remove what killed runs leave behind: atomic_write's temp files in the run dir and checkpoint/, the
    trainer's scratch folders, and checkpoint folders latest.json does not commit. Call it at start-up while
    holding the run's lock.

    With an unreadable latest.json nothing in checkpoint/ is touched (it may be needed to recover).
    """
    run_dir, removed = Path(run_dir), []
    removed += remove_temp_files(run_dir)
    for p in run_dir.glob(SCRATCH_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return removed
    removed += remove_temp_files(root)
    if (root / LATEST).exists():
        try:
            keep = committed_folder(run_dir)[0].name
        except VitlabError:
            return removed
    else:
        keep = None  # never committed: every step folder is a half-written first checkpoint
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The global torch RNG (dropout, drop-path), CUDA's if in use, and the named generators."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    out.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
    return out


def restore_rng(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator], *,
                source: str = "checkpoint") -> None:
    """Set the generators from `rng_states` output; every state must be uint8 of the generator's size."""
    wanted = {"torch": torch.get_rng_state()}
    if "cuda" in states and torch.cuda.is_available():
        wanted["cuda"] = torch.cuda.get_rng_state()
    wanted.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
    for key, now in wanted.items():
        if key not in states:
            raise VitlabError(f"{source}: no state for the {key.removeprefix('gen.')!r} random generator")
        s = states[key]
        if s.dtype != torch.uint8 or s.shape != now.shape:
            raise VitlabError(f"{source}: random generator state {key!r} is {_dtype(s)} {tuple(s.shape)}, "
                              f"expected uint8 {tuple(now.shape)}")
    try:
        torch.set_rng_state(states["torch"])
        if "cuda" in wanted:
            torch.cuda.set_rng_state(states["cuda"])
        for k, g in generators.items():
            g.set_state(states[f"gen.{k}"])
    except RuntimeError as e:  # right size, impossible content
        raise VitlabError(f"{source}: a random generator state is invalid ({e})") from None


# ---- a mid-epoch checkpoint's training sums ---------------------------------------------------------------
def read_epoch_sums(state: dict, source: str) -> dict:
    """A mid-epoch checkpoint's training sums so far, checked; {} at an epoch end. Saved over all ranks ("loss":
    the sum of the steps' global mean losses), so rank 0 alone goes on from them, whatever the world size."""
    sums = state.get("epoch_sums") or {}
    if not sums or not is_main():
        return {}
    if not isinstance(sums, dict):
        raise VitlabError(f"{source}: field 'epoch_sums' must be an object, got {sums!r}")
    correct = sums.get("correct")
    return {"loss": check_number(sums.get("loss"), "epoch_sums.loss", source) * get_world_size(),
            "correct": None if correct is None else check_count(correct, "epoch_sums.correct", source)}


# ---- randomness ------------------------------------------------------------------------------------------
def rank_seed(seed: int, rank: int, step: int, name: str) -> int:
    """A seed for generator `name` of rank `rank` from step `step`, unrelated to every other (seed, rank, step)."""
    entropy = [seed % 2**32, rank, step, zlib.crc32(name.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)


def seed_rank(generators: dict[str, torch.Generator], *, seed: int, step: int = 0, rank: int | None = None) -> None:
    """Give rank r > 0 its own streams: the global torch RNG (dropout, drop path) and every named generator
    (augmentation). Rank 0 keeps the single-process seeds, so one process is unaffected."""
    rank = get_rank() if rank is None else rank
    if rank == 0:
        return
    torch.manual_seed(rank_seed(seed, rank, step, "torch"))
    for name, g in generators.items():
        g.manual_seed(rank_seed(seed, rank, step, name))


def gather_rng(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Every rank's generator states for the checkpoint: rank 0's under their own names (as one process saves
    them), rank r's as "rank<r>.<name>". A collective: every rank calls it."""
    mine = rng_states(generators)
    if get_world_size() == 1:
        return mine
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, mine)
    out = dict(states[0])
    for r, st in enumerate(states[1:], start=1):
        out.update({f"rank{r}.{k}": v for k, v in st.items()})
    return out


def restore_rank_rng(saved: dict[str, torch.Tensor], generators: dict[str, torch.Generator], *, seed: int,
                     step: int, source: str) -> None:
    """This rank's generator states from a checkpoint written by `gather_rng`: its own when the checkpoint has
    them (same number of processes or more), else (a rank the saving run did not have) fresh streams."""
    rank = get_rank()
    if rank == 0:
        restore_rng(saved, generators, source=source)
        return
    prefix = f"rank{rank}."
    own = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    if own:
        restore_rng(own, generators, source=source)
    else:
        seed_rank(generators, seed=seed, step=step, rank=rank)
