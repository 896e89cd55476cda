"""AdamW with the usual ViT parameter groups (optionally with layer-wise lr decay), and the per-step warmup +
cosine learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitlab.errors import VitlabError


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything that should not shrink towards zero.

    No decay on norms and biases (ndim <= 1: decaying a LayerNorm gain or a bias only fights the
    normalisation) nor on what `model.no_weight_decay()` names (class token, positions: decay would pull
    them to zero and erase position information). Same rule as timm's `param_groups_weight_decay`.
    Each group also carries the parameter `names`, for inspection. Frozen parameters (requires_grad False,
    e.g. a linear probe's backbone) are left out.

    `layer_decay` (fine-tuning, BEiT / timm's `param_groups_layer_decay`): one pair of groups per layer, each
    with an "lr_scale" of layer_decay ** (depth + 1 - layer), where the embeddings are layer 0, block i is
    layer i + 1 (the final norm goes with the last block) and pooling and head are layer depth + 1 (scale 1).
    A Swin's blocks count over all stages, a stage's patch merging going with its first block (`layers_of`).
    `WarmupCosine.apply` multiplies each group's learning rate by its lr_scale.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth, layer_of = layers_of(model) if layer_decay is not None else (0, lambda name: 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = layer_of(name)
        g = groups.setdefault((layer, decayed), {"params": [], "names": [],
                                                 "weight_decay": weight_decay if decayed else 0.0})
        if layer_decay is not None:
            g["lr_scale"] = layer_decay ** (depth + 1 - layer)
        g["names"].append(name)
        g["params"].append(p)
    if layer_decay is None:  # always the two groups, decayed first, even when one is empty
        empty = {"params": [], "names": []}
        return [groups.get((0, True), {**empty, "weight_decay": weight_decay}),
                groups.get((0, False), {**empty, "weight_decay": 0.0})]
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


_STEM = ("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")


def layer_id(name: str, depth: int) -> int:
    """Layer of a ViT parameter for layer-wise lr decay: 0 the embeddings, i + 1 block i, depth the final
    norm, depth + 1 the rest (fc_norm, pooling, heads), as timm's `group_matcher` for VisionTransformer."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return depth
    return 0 if name.startswith(_STEM) else depth + 1


def swin_layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Layer of a Swin parameter, as timm's `group_matcher` for SwinTransformer numbers them: 0 the patch
    embedding, then one per block over all stages (`layers.i.downsample` with block 0 of stage i), the final
    norm with the last block, the head last (sum(depths) + 1)."""
    depth = sum(depths)
    parts = name.split(".")
    if parts[0] == "layers":  # layers.{i}.downsample.* or layers.{i}.blocks.{j}.*
        i = int(parts[1])
        return sum(depths[:i]) + (0 if parts[2] == "downsample" else int(parts[3])) + 1
    if parts[0] == "norm":
        return depth
    return 0 if parts[0] == "patch_embed" else depth + 1


def layers_of(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    """(blocks, parameter name -> layer) for layer-wise lr decay: a ViT's `blocks`, or a Swin's stages."""
    depths = getattr(getattr(model, "cfg", None), "depths", None)
    if isinstance(getattr(model, "layers", None), nn.Sequential) and depths:  # a Swin: stages of blocks
        return sum(depths), lambda name: swin_layer_id(name, tuple(depths))
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise VitlabError(f"layer-wise lr decay (--layer-decay) needs a ViT's `blocks` or a Swin's stages; "
                          f"{type(model).__name__} has neither")
    return len(blocks), lambda name: layer_id(name, len(blocks))


OPTIMIZERS = ("adamw", "muon")
DECAYS = ("cosine", "linear", "onecycle")
ONECYCLE_WARMUP = 0.4  # one-cycle: the rise takes 2/5 of the run, the fall to lr/20 the next 2/5 (ConvMixer)


def create_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.999), optimizer: str = "adamw",
                     momentum: float = 0.95, layer_decay: float | None = None
                     ) -> torch.optim.Optimizer | OptimizerGroup:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) over `param_groups(model)`; or, with
    optimizer="muon", torch's Muon for the hidden 2-D weights (`muon_params`) and AdamW for the rest.

    Muon scales its update to AdamW's RMS (adjust_lr_fn="match_rms_adamw", Moonshot's "Muon is scalable"),
    so both share one learning rate, schedule and weight decay. `layer_decay` gives every group (Muon's
    too) its layer's "lr_scale" (see `param_groups`). Only parameters that require grad are optimised.
    """
    if optimizer not in OPTIMIZERS:
        raise VitlabError(f"optimizer {optimizer!r} unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise VitlabError("the model has no trainable parameters (is everything frozen?)")
    hidden = muon_params(model) if optimizer == "muon" else {}
    scaled = layer_decay is not None
    groups, scale = [], {}
    for g in param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay):
        scale.update(dict.fromkeys(g["names"], g.get("lr_scale", 1.0)))
        groups.append({"params": [p for n, p in zip(g["names"], g["params"]) if n not in hidden],
                       "weight_decay": g["weight_decay"], **({"lr_scale": g["lr_scale"]} if scaled else {})})
    adamw = adamw_for([g for g in groups if g["params"]], lr=lr, betas=betas, weight_decay=weight_decay)
    if not hidden:
        return adamw
    params = dict(model.named_parameters())
    by_split: dict[tuple[int, float], list] = {}
    for name, chunks in hidden.items():
        by_split.setdefault((chunks, scale[name]), []).append(params[name])
    muon = SplitMuon([{"params": ps, "chunks": k, **({"lr_scale": s} if scaled else {})}
                      for (k, s), ps in sorted(by_split.items())], lr=lr,
                     weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
    return OptimizerGroup([adamw, muon])


def adamw_for(groups: list[dict], **kw) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel per tensor) where every parameter is an fp32 CPU or CUDA tensor.

    On CPU torch's default is the for-loop AdamW, about 6 elementwise passes per tensor (foreach loops over them
    the same way there); the fused kernel makes one, ~5x faster on a ViT's parameters, the same update.
    """
    params = [p for g in groups for p in g["params"]]
    if all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except RuntimeError:  # a torch without the fused kernel for this device (CPU: before 2.4)
            pass
    return torch.optim.AdamW(groups, **kw)


def muon_params(model: nn.Module) -> dict[str, int]:
    """Names of the weights Muon orthogonalises -> how many matrices each holds along dim 0.

    The hidden 2-D weights: every Linear inside the transformer blocks and the MAP head (fused qkv counts
    as 3 matrices, the MAP head's kv as 2). Embeddings, the conv stem, the classifier heads, norms, biases,
    tokens and positions stay on AdamW (Muon is for hidden layers only).
    """
    out = {}
    for name, m in model.named_modules():
        parts = name.split(".")
        if isinstance(m, nn.Linear) and m.weight.requires_grad and ("blocks" in parts or "attn_pool" in parts):
            out[f"{name}.weight"] = 3 if parts[-1] == "qkv" else 2 if parts[-1] == "kv" else 1
    return out


class SplitMuon(torch.optim.Muon):
    """torch.optim.Muon that orthogonalises a fused weight as separate matrices: a group's "chunks" > 1
    hands Muon's update views of the weight, its gradient and its momentum, cut along dim 0."""

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        k = group.get("chunks", 1)
        if k > 1:
            for lst in (params_with_grad, grads, muon_momentum_bufs):
                lst[:] = [piece for t in lst for piece in t.chunk(k, dim=0)]
        return has_complex


class OptimizerGroup:
    """Several optimizers stepped as one: their param_groups side by side (a schedule sets every group's
    lr), one state dict in torch's layout (parameter indices numbered across the optimizers)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @property
    def defaults(self) -> dict:
        return self.optimizers[0].defaults

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        for o in self.optimizers:
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            o.load_state_dict({"state": {int(i) - offset: s for i, s in state_dict["state"].items()
                                         if offset <= int(i) < offset + n},
                               "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += n


def warmup_steps(config, total: int, steps_per_epoch: int) -> int:
    """The warmup of a run of `total` steps: config.warmup_epochs (at most a fifth of a time budget's run, which
    may end sooner than planned), or the first 2/5 of the run for the one-cycle schedule."""
    if config.decay == "onecycle":  # its rise is a share of the run, whatever the run's length
        return round(ONECYCLE_WARMUP * total)
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total)
    return min(warmup, total // 5) if config.time_budget else warmup


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate per optimizer step: linear warmup to `base_lr`, then cosine (or linear) down to `min_lr`.

    step s (0-based) of `total_steps`, p = (s - W) / (total_steps - W):
      s <  W: base_lr * (s + 1) / W             (the first step already moves; step W-1 is at base_lr)
      s >= W: min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2    (decay "cosine")
              min_lr + (base_lr - min_lr) * (1 - p)                  (decay "linear", Li et al. 2020)
              min_lr + (base_lr - min_lr) * piecewise-linear 1 -> 1/20 at p = 2/3 -> 0   (decay "onecycle")
    so the decay starts at base_lr at s = W and would reach min_lr one step after the last. "onecycle" is
    ConvMixer's CIFAR schedule (Trockman & Kolter 2022: 0 -> lr at 2/5 of the run -> lr/20 at 4/5 -> 0) when
    W is 2/5 of total_steps, which the Trainer gives it (`ONECYCLE_WARMUP`).
    A pure function of the step: resuming only needs the step count.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay: str = "cosine"

    def __call__(self, step: int) -> float:
        W, T = self.warmup_steps, max(self.total_steps, 1)
        if step < W:
            return self.base_lr * (step + 1) / W
        p = min((step - W) / max(T - W, 1), 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * p))
        elif self.decay == "onecycle":  # the knee (2/3 of the fall) is 4/5 of the run when W is 2/5 of it
            knee, floor = 2 / 3, 1 / 20
            shape = 1.0 - (1.0 - floor) * p / knee if p <= knee else floor * (1.0 - p) / (1.0 - knee)
        else:
            shape = 1.0 - p
        return self.min_lr + (self.base_lr - self.min_lr) * shape

    def state_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> WarmupCosine:
        """This schedule with its peak and floor times `factor` (the NaN guard's skip mode lowers both)."""
        return dataclasses.replace(self, base_lr=self.base_lr * factor, min_lr=self.min_lr * factor)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for `step` (times the group's "lr_scale" under layer decay); returns it."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr
