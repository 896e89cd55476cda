"""The shared loop on several processes (`torchrun ... -m vitlab train`): what `Trainer` and the tasks call so
that N ranks train one run, built on the helpers of vitlab.train.distributed.

- `distributed_run(device)`: join torchrun's process group for one run (gloo on a CPU, NCCL on CUDA) and give
  this rank's device; one process runs exactly as before.
- Batches: `--batch-size` is per process, the global batch is that times the world size; a resumed run keeps
  its global batch whatever the number of processes (`batch_sizes`).
- Decisions that read a clock (the time budget) are made on rank 0 and broadcast (`agreed`), so every rank
  takes the same number of steps.
- Evaluation over the ranks lives with evaluation (`vitlab.train.evaluate.evaluate_sharded`); every rank's
  random streams and a mid-epoch checkpoint's sums with the checkpoints (`vitlab.train.checkpoint.seed_rank`,
  `gather_rng`, `read_epoch_sums`).
- Fault tolerance: when torchrun restarts a failed job (`--max-restarts`), `restarted_run` tells train() to
  resume the run dir its earlier attempt wrote instead of refusing it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from vitlab.errors import VitlabError
from vitlab.rundir import RUN_CONFIG
from vitlab.train.distributed import (
    barrier,
    broadcast_object,
    close_distributed,
    detect,
    get_world_size,
    init_distributed,
    is_main,
    local_device,
    wrap_ddp,
)
from vitlab.train.runtime import resolve_device

T = TypeVar("T")
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun: 0 in the first attempt, k in the k-th restart
RUN_ID = "TORCHELASTIC_RUN_ID"  # torchrun's --rdzv-id (a fresh uuid with --standalone)


# ---- the process group -----------------------------------------------------------------------------------
@contextmanager
def distributed_run(device: str | torch.device = "auto") -> Iterator[torch.device]:
    """This rank's device for one run, inside torchrun's process group when torchrun started the process.

    Joins the group if nobody has yet and leaves it at the end only then (a caller's own group stays).
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    joined_here = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(dev)
    try:
        yield local_device(dev)
    finally:
        if joined_here and env.distributed:
            close_distributed()


def joins_torchrun(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a run's entry point (train, resume, ...): its `device` argument becomes this rank's device,
    inside `distributed_run` (nested entry points, e.g. a teacher trained first, share the group)."""
    @functools.wraps(fn)
    def run(*args, device: str | torch.device = "auto", **kwargs) -> T:
        with distributed_run(device) as dev:
            return fn(*args, device=dev, **kwargs)

    return run


def first_per_node(fn: Callable[[], T]) -> T:
    """`fn()` on each machine's first process before the others (a download or a decode cache is made once
    per node, then read by the rest). `fn` must not use collectives: the other ranks wait in a barrier."""
    if get_world_size() == 1:
        return fn()
    first = detect().local_rank == 0
    if first:
        out = fn()
    barrier()
    if not first:
        out = fn()
    return out


def agreed(value: T) -> T:
    """Rank 0's `value` on every rank (a decision that reads the clock must be the same everywhere)."""
    if get_world_size() == 1:
        return value
    return broadcast_object(value if is_main() else None)


def describe_batch(per_rank: int) -> str:
    """The global batch for the log: "64", or "64 (2 processes x 32, gloo)"."""
    world = get_world_size()
    if world == 1:
        return str(per_rank)
    return f"{per_rank * world} ({world} processes x {per_rank}, {dist.get_backend()})"


def launch_record() -> dict:
    """What train_config.json says about the processes of the start that wrote it."""
    if get_world_size() == 1:
        return {"world_size": 1}
    return {"world_size": get_world_size(), "backend": dist.get_backend(), "run_id": os.environ.get(RUN_ID)}


def restarted_run(out: str | Path) -> bool:
    """True in a torchrun restart (`--max-restarts`) of the job whose earlier attempt started the run in `out`:
    train() resumes it then, since the same command line is launched again. Decided on rank 0."""
    def check() -> bool:
        if int(os.environ.get(RESTART_COUNT) or 0) < 1 or not (Path(out) / RUN_CONFIG).is_file():
            return False
        from vitlab.weights import read_json

        launch = read_json(Path(out) / RUN_CONFIG).get("launch") or {}
        return isinstance(launch, dict) and launch.get("run_id") == os.environ.get(RUN_ID)

    return agreed(check() if is_main() else None)


# ---- batches ---------------------------------------------------------------------------------------------
def batch_sizes(batch_size: int, train_size: int, plan: dict | None) -> tuple[int, int]:
    """(per-process batch, global batch). A new run: `batch_size` per process (at most train_size / world);
    a resumed one: the global batch of its plan split over this run's processes."""
    world = get_world_size()
    if plan is None:
        per_rank = max(1, min(batch_size, train_size // world))
        return per_rank, per_rank * world
    total = int(plan.get("global_batch_size", plan["batch_size"]))  # older plans: one process
    if total % world:
        raise VitlabError(f"this run's global batch of {total} does not split over {world} processes; resume it "
                          f"on a number of processes that divides {total}")
    return total // world, total


# ---- the model -------------------------------------------------------------------------------------------
def data_parallel(step):
    """`step` (a vitlab.speed.TrainStep) with its forward and backward inside DistributedDataParallel, which
    averages the gradients over the ranks before the clip and the optimizer step; unchanged for one process.

    DDP wraps the module that computes (for bf16-pure, the bf16 copy whose gradients become the master's), and
    goes inside torch.compile, as PyTorch recommends.
    """
    if get_world_size() == 1:
        return step
    compiled = step.forward is not step.compute
    ddp = wrap_ddp(step.compute)
    step.forward = torch.compile(ddp) if compiled else ddp
    return step
