"""Contrastive losses when the batch is split over ranks (data parallel).

Both return this rank's share of the global loss: the mean over ranks equals the single-process loss on the
whole batch. Every rank backpropagates its own share; the collectives send gradients back to the rank that
owns each embedding, so the gradient reaching a local shard is world_size x d(global loss)/d(shard), and
DDP's averaging of parameter gradients over ranks turns that into exactly d(global loss)/d(params).

CLIP needs every text for every image (softmax over the whole batch): all-gather with gradients, as
open_clip's `gather_with_grad`. SigLIP's pairs are independent, so texts travel round a ring instead and each
rank only ever holds its own B_local x B_local block of logits (Zhai et al. 2023, open_clip `SigLipLoss`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from vitlab.clip.losses import clip_scale, siglip_pair_loss_sum


def clip_loss_distributed(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                          *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's share of the CLIP loss over the global batch (local images/texts vs all texts/images)."""
    rank = dist.get_rank(group)
    all_images = torch.cat(all_gather(image_embeds, group=group))  # (W*B, E), gradients flow back
    all_texts = torch.cat(all_gather(text_embeds, group=group))
    scale = clip_scale(logit_scale)
    B = image_embeds.shape[0]
    labels = torch.arange(B, device=image_embeds.device) + rank * B  # global index of each local pair
    per_image = F.cross_entropy(scale * image_embeds @ all_texts.T, labels)  # (B, W*B) logits
    per_text = F.cross_entropy(scale * text_embeds @ all_images.T, labels)
    # The global loss averages over all W*B rows in each direction, so it is the mean of the W shares.
    return (per_image + per_text) / 2


class _Exchange(torch.autograd.Function):
    """Send `tensor` to rank `to`, receive one from rank `source`; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to: int, source: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.to, ctx.source, ctx.group = to, source, group
        return _exchange(tensor, to=to, source=source, group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Exchange.apply(grad, ctx.source, ctx.to, ctx.group), None, None, None


class _ExchangeBidir(torch.autograd.Function):
    """Send one tensor to the left and one to the right neighbour at once; receive from both."""

    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int,  # type: ignore[override]
                group) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.left, ctx.right, ctx.group = left, right, group
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        ops = [dist.P2POp(dist.isend, to_left.contiguous(), _global(left, group), group),
               dist.P2POp(dist.isend, to_right.contiguous(), _global(right, group), group),
               dist.P2POp(dist.irecv, from_left, _global(left, group), group),
               dist.P2POp(dist.irecv, from_right, _global(right, group), group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):  # type: ignore[override]
        # what came from the left goes back to the left, and so on: the same exchange with roles swapped
        g_left, g_right = _ExchangeBidir.apply(grad_from_left, grad_from_right, ctx.left, ctx.right, ctx.group)
        return g_left, g_right, None, None, None


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(tensor: torch.Tensor, *, to: int, source: int, group) -> torch.Tensor:
    out = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), _global(to, group), group),
           dist.P2POp(dist.irecv, out, _global(source, group), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def siglip_loss_distributed(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                            logit_bias: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                            bidir: bool = True) -> torch.Tensor:
    """This rank's share of the SigLIP loss over the global batch; text shards go round the ring.

    Step 0 scores the local block (positives on its diagonal); then W-1 exchanges bring every other rank's
    texts (negatives only). bidir: pass texts left and right at once, so only ceil((W-1)/2) rounds are needed.
    Every share is divided by the local batch size, as big_vision / open_clip do.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    right, left = (rank + 1) % world, (rank - 1) % world
    total = siglip_pair_loss_sum(image_embeds, text_embeds, logit_scale, logit_bias)

    def negatives(texts: torch.Tensor) -> torch.Tensor:
        return siglip_pair_loss_sum(image_embeds, texts, logit_scale, logit_bias, positive_offset=None)

    if bidir:
        to_left = to_right = text_embeds
        rounds, odd = divmod(world - 1, 2)
        for _ in range(rounds):  # after round k we hold the texts of ranks rank-k-1 and rank+k+1
            from_left, from_right = _ExchangeBidir.apply(to_left, to_right, left, right, group)
            total = total + negatives(from_left) + negatives(from_right)
            to_left, to_right = from_right, from_left
        if odd:  # even world size: one rank's texts are still missing, take them from the left
            total = total + negatives(_Exchange.apply(to_right, right, left, group))
    else:
        texts = text_embeds
        for _ in range(world - 1):
            texts = _Exchange.apply(texts, right, left, group)
            total = total + negatives(texts)
    return total / image_embeds.shape[0]
