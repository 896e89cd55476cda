"""The shared loop on several processes (`torchrun ... -m vitlab train`): what `Trainer` and the tasks call so
that N ranks train one run, built on the helpers of vitlab.train.distributed.

- `distributed_run(device)`: join torchrun's process group for one run (gloo on a CPU, NCCL on CUDA) and give
  this rank's device; one process runs exactly as before.
- Batches: `--batch-size` is per process, the global batch is that times the world size; a resumed run keeps
  its global batch whatever the number of processes (`batch_sizes`).
- Decisions that read a clock (the time budget) are made on rank 0 and broadcast (`agreed`), so every rank
  takes the same number of steps.
- Evaluation: each rank scores every world_size-th example and the sums are all-reduced (`evaluate_sharded`).
- Randomness: rank 0 keeps the single-process seeds; rank r > 0 gets its own dropout / augmentation streams
  (`seed_rank`). Checkpoints hold every rank's generator states (`gather_rng`), so a run restarted on as many
  processes resumes bit-exactly; on another number of processes the extra ranks are seeded afresh.
- Fault tolerance: when torchrun restarts a failed job (`--max-restarts`), `restarted_run` tells train() to
  resume the run dir its earlier attempt wrote instead of refusing it.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vitlab.errors import VitlabError, check_count, check_number
from vitlab.rundir import RUN_CONFIG
from vitlab.train.checkpoint import restore_rng, rng_states
from vitlab.train.distributed import (
    _collective_device,
    all_reduce_sum,
    barrier,
    broadcast_object,
    close_distributed,
    detect,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    local_device,
    wrap_ddp,
)
from vitlab.train.evaluate import EvalResult, evaluate
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


# ---- evaluation ------------------------------------------------------------------------------------------
def merge_results(results: list[EvalResult], *, across_ranks: bool = True) -> EvalResult:
    """One EvalResult from several (at least one) over disjoint examples: batches, and with `across_ranks`
    every rank's (a collective then)."""
    n = sum(r.count for r in results)
    sums = {"loss": sum(r.loss * r.count for r in results), "top1": sum(r.top1 * r.count for r in results),
            "top5": sum(r.top5 * r.count for r in results), "count": n}
    confusion = torch.stack([r.confusion for r in results]).sum(0)
    if across_ranks and get_world_size() > 1:
        sums = all_reduce_sum(sums)
        confusion = confusion.to(_collective_device())
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        confusion = confusion.cpu()
    count = int(round(sums["count"]))
    n = max(count, 1)
    plain = merge_results([r.plain for r in results], across_ranks=across_ranks) \
        if all(r.plain is not None for r in results) else None
    return EvalResult(sums["loss"] / n, round(sums["top1"]) / n, round(sums["top5"]) / n, count, confusion, plain)


def evaluate_sharded(model, images: torch.Tensor, labels: torch.Tensor, **kw) -> EvalResult:
    """`vitlab.train.evaluate.evaluate` over all ranks: rank r scores examples r, r + W, r + 2W, ... (the
    "exact" shard of vitlab.train.distributed.shard: each example once), then the sums are all-reduced.
    Every rank must call it; one process evaluates everything itself."""
    world = get_world_size()
    if world == 1:
        return evaluate(model, images, labels, **kw)
    rank = get_rank()
    return merge_results([evaluate(model, images[rank::world], labels[rank::world], **kw)])


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
