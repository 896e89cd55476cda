"""Data-parallel helpers on torch.distributed: what `torchrun` set, the process group, DDP, shards, reductions.

`torchrun --nproc_per_node N -m vitlab train ...` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK (and
MASTER_ADDR / MASTER_PORT) in their environment; `init_distributed` reads them and joins the group (gloo on a
CPU, NCCL on CUDA). Without them everything here is a no-op for one process, so the same code runs either way.

Each rank trains on a disjoint shard of every epoch's permutation, drawn exactly as torch's
`DistributedSampler` draws it (a generator seeded with seed + epoch), so a run's data order depends only on
(seed, epoch, world size), never on which process asks. Only rank 0 writes (`is_main`).
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

# the data layer's (its samplers use them too), re-exported here
from vitlab.data.shard import _joined, epoch_permutation, get_rank, get_world_size, shard, shard_permutation  # noqa: F401
from vitlab.errors import VitlabError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")
# what a collective raises when a peer process is gone (gloo: "Connection closed by peer", a reset)
LOST_PEER_WORDS = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "tcpstore")


class PeerStopped(VitlabError):
    """Rank 0 refused the run (it prints why, in one line); the other ranks stop with the same message, silently."""


class PeerLost(VitlabError):
    """A collective failed because another process of the job is gone (killed, crashed, refused): this rank
    stops with one line of its own (`every_rank`), not a chain of tracebacks; torchrun restarts or ends the job."""

    every_rank = True


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank, number of processes, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv torchrun describes in the environment; one process (rank 0 of 1) when it set nothing."""
    env = os.environ if environ is None else environ
    values = {}
    for name in ENV_VARS:
        raw = env.get(name, "")
        try:
            values[name] = int(raw) if raw != "" else None
        except ValueError:
            raise VitlabError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world is None:
        if rank not in (None, 0):
            raise VitlabError(f"RANK={rank} is set but WORLD_SIZE is not; launch with torchrun")
        return DistEnv()
    rank = 0 if rank is None else rank
    local = rank if local is None else local
    if world < 1 or not 0 <= rank < world or local < 0:
        raise VitlabError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: str | torch.device = "cpu", *, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (no-op for one process or when already joined).

    backend None: "nccl" for a CUDA device (each process on cuda:LOCAL_RANK), else "gloo". Rendezvous is
    torchrun's env:// (MASTER_ADDR, MASTER_PORT), which also covers several machines (--nnodes).
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), detect().local_rank)
    env = detect()
    if not env.distributed:
        return env
    if not dist.is_available():
        raise VitlabError("this PyTorch build has no torch.distributed; run one process")
    device = torch.device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)  # before the group, so NCCL binds each rank to its own GPU
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
    # torchrun keeps its store through restarts (--max-restarts): each attempt gets its own keys, or the new
    # processes would read the dead ones' addresses and fail to connect
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT') or 0}", store)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank uses: cuda:LOCAL_RANK for a CUDA device under torchrun, else `device` itself."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", detect().local_rank)
    return device


def close_distributed() -> None:
    """Leave the process group (at the end of a run) if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a peer is gone: the error that stopped the run is already on its way
            if not is_lost_peer(e):
                raise


def is_main() -> bool:
    """True on the one process that writes the run dir, metrics, checkpoints and progress bars."""
    return get_rank() == 0


def barrier() -> None:
    if _joined():
        dist.barrier()


def rank0_decides(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 alone (claiming the run dir, writing its files), with its refusal shared: a VitlabError
    or OSError there stops every rank at once (rank 0 raises it, the others `PeerStopped`), so no rank is left
    waiting in a collective for a process that has gone. Other ranks get None; one process just calls `fn`."""
    if get_world_size() == 1:
        return fn()
    if get_rank() == 0:
        try:
            out = fn()
        except (VitlabError, OSError) as e:
            broadcast_object(str(e) or type(e).__name__)
            raise
        broadcast_object(None)
        return out
    refusal = broadcast_object(None)
    if refusal is not None:
        raise PeerStopped(refusal)
    return None


def is_lost_peer(e: BaseException) -> bool:
    """Did a collective fail because another process of the job is gone? (torch raises DistError subclasses,
    or a RuntimeError from gloo / NCCL naming the broken connection.)"""
    if isinstance(e, VitlabError) or not _joined() or get_world_size() == 1:
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in LOST_PEER_WORDS)


@contextmanager
def peers_lost_quietly() -> Iterator[None]:
    """Inside the block, a collective that fails because a peer is gone raises `PeerLost` (one line, exit 2)
    instead of its chain of tracebacks."""
    try:
        yield
    except Exception as e:
        if not is_lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PeerLost(f"rank {get_rank()}: another process of this job is gone ({first}); torchrun restarts the "
                       f"job (--max-restarts) or ends it") from None


def quiet_on_lost_peer(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: `fn` runs inside `peers_lost_quietly()`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with peers_lost_quietly():
            return fn(*args, **kwargs)
    return wrapper


# ---- the model -------------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """`model` in DistributedDataParallel when this process is in a group of several, else `model` itself.

    The model must already be on its device (cuda:LOCAL_RANK or the CPU). DDP broadcasts rank 0's weights
    at construction, so every rank starts from the same model even if their initialisations differed.
    """
    if get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what is saved and evaluated); anything else unchanged."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- collectives -----------------------------------------------------------------------------------------
def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """{name: sum over ranks} of this rank's numbers (e.g. correct, seen, loss sum), in one float64 all-reduce.

    float64 so counts up to 2^53 stay exact; one process returns its own values.
    """
    names = list(values)
    local = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
    if get_world_size() > 1 and names:
        local = local.to(_collective_device())
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return dict(zip(names, local.cpu().tolist()))


def broadcast_object(obj: Any = None, *, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable; e.g. the time budget's step count, decided on rank 0)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]
