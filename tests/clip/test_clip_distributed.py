"""Distributed CLIP / SigLIP losses on real gloo process groups equal the single-process loss on the full batch.

Each rank holds B rows of a global batch of W*B. The mean of the ranks' losses must equal the dense loss, the
gradient reaching each local shard must be W x the dense gradient of those rows (DDP then averages over
ranks), and the mean of the ranks' temperature/bias gradients must equal the dense ones.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import join_ranks, run_ranks
from vitlab.clip.distributed import clip_loss_distributed, siglip_loss_distributed
from vitlab.clip.losses import clip_loss, siglip_loss

B, E = 3, 6
VARIANTS = ("clip", "siglip_bidir", "siglip_ring")


def _global_batch(world):
    g = torch.Generator().manual_seed(world)
    img = F.normalize(torch.randn(world * B, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + torch.randn(world * B, E, generator=g, dtype=torch.float64), dim=-1)
    t = torch.tensor(math.log(10.0), dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    return img, txt, t, bias


def _worker(rank, world, port, out_dir):
    join_ranks(rank, world, port)
    dist.init_process_group("gloo")
    try:
        img, txt, t, bias = _global_batch(world)
        rows = slice(rank * B, (rank + 1) * B)
        results = {}
        for variant in VARIANTS:
            leaves = [x.clone().requires_grad_(True) for x in (img[rows], txt[rows], t, bias)]
            if variant == "clip":
                loss = clip_loss_distributed(*leaves[:3])
            else:
                loss = siglip_loss_distributed(*leaves, bidir=variant == "siglip_bidir")
            loss.backward()
            results[variant] = [loss.detach()] + [x.grad if x.grad is not None else torch.zeros(()) for x in leaves]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])  # 3 ranks also exercise the two-way (left + right) exchange
def test_distributed_losses_match_full_batch(world, tmp_path):
    per_rank = run_ranks(_worker, tmp_path, world=world)
    img, txt, t, bias = _global_batch(world)
    for variant in VARIANTS:
        leaves = [x.clone().requires_grad_(True) for x in (img, txt, t, bias)]
        if variant == "clip":
            dense = clip_loss(*leaves[:3])
        else:
            dense = siglip_loss(*leaves)
        dense.backward()
        losses = torch.stack([r[variant][0] for r in per_rank])
        torch.testing.assert_close(losses.mean(), dense.detach(), rtol=1e-12, atol=1e-12, msg=variant)
        for k in (1, 2):  # image and text shards
            got = torch.cat([r[variant][k] for r in per_rank])
            torch.testing.assert_close(got, world * leaves[k - 1].grad, rtol=1e-10, atol=1e-12, msg=variant)
        for k in ((3,) if variant == "clip" else (3, 4)):  # temperature (and bias)
            got = torch.stack([r[variant][k] for r in per_rank]).mean()
            torch.testing.assert_close(got, leaves[k - 1].grad, rtol=1e-10, atol=1e-12, msg=variant)
