"""Which examples this process takes: the epoch's permutation as torch's `DistributedSampler` draws it, cut into
this rank's shard, and the process group's rank and size (one process: 0 and 1). In the data layer, so samplers
(vitlab.data.stream) use it without importing vitlab.train; vitlab.train.distributed re-exports it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _joined() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _joined() else 1


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of `n` examples in `epoch`: torch's DistributedSampler draw (seed + epoch)."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def shard(indices: torch.Tensor, *, rank: int, world_size: int,
          mode: Literal["pad", "drop", "exact"] = "pad") -> torch.Tensor:
    """This rank's share of `indices`: every world_size-th one, starting at `rank`.

    "pad": repeat indices from the start until all ranks get as many (DistributedSampler's default);
    "drop": cut the tail instead (drop_last=True); "exact": no padding, ranks may differ by one, and every
    index lands on exactly one rank (evaluation, where sums over ranks must count each example once).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    n = len(indices)
    if mode == "pad":
        total = -(-n // world_size) * world_size
        if total > n and n:
            reps = -(-(total - n) // n)
            indices = torch.cat([indices, indices.repeat(reps)[: total - n]])
    elif mode == "drop":
        indices = indices[: n - n % world_size] if n % world_size else indices
    elif mode != "exact":
        raise ValueError(f"shard mode must be 'pad', 'drop' or 'exact', not {mode!r}")
    return indices[rank::world_size]


def shard_permutation(n: int, *, seed: int, epoch: int, rank: int, world_size: int,
                      drop_last: bool = False) -> torch.Tensor:
    """This rank's examples of `epoch`, in order: `list(DistributedSampler(...))` after `set_epoch(epoch)`."""
    perm = epoch_permutation(n, seed=seed, epoch=epoch)
    return shard(perm, rank=rank, world_size=world_size, mode="drop" if drop_last else "pad")


