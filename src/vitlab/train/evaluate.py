"""Batched evaluation (loss, top-1, top-5, per-class accuracy, confusion matrix) and `vitlab eval`'s run report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitlab.data import load_dataset, normalize
from vitlab.errors import VitlabError
from vitlab.modeldir import open_model_dir
from vitlab.rundir import (
    CONFUSION_PNG,
    EVAL_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    read_metrics,
    weights_sha256,
    write_eval,
)
from vitlab.speed import inference_forward
from vitlab.train.distributed import _collective_device, all_reduce_sum, get_rank, get_world_size
from vitlab.train.lock import RunLock
from vitlab.train.metrics import figures
from vitlab.train.runtime import resolve_device
from vitlab.train.tta import view_logits


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy against the hard labels
    top1: float  # fractions in [0, 1]
    top5: float  # top-min(5, K)
    count: int
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = predicted
    plain: EvalResult | None = None  # with TTA: the same images without it, scored in the same pass

    @property
    def per_class(self) -> list[float]:
        """Recall of each class (diagonal over row sums); NaN for a class with no samples."""
        c = self.confusion.double()
        return (c.diagonal() / c.sum(1)).tolist()

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """`summary` of the plain evaluation, and of the TTA one with the suffix _tta when it was taken."""
        if self.plain is None:
            return self.summary(prefix)
        return {**self.plain.summary(prefix), **{k + "_tta": v for k, v in self.summary(prefix).items()}}


class Scores:
    """Sums of one evaluation, batch by batch: loss, top-1, top-k hits and the confusion matrix."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes, self.k = num_classes, min(5, num_classes)
        self.loss_sum, self.top1, self.topk = 0.0, 0, 0
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.topk(self.k, dim=1).indices  # (B, k)
        self.top1 += (pred[:, 0] == y).sum().item()
        self.topk += (pred == y[:, None]).any(1).sum().item()
        self.confusion += torch.bincount(y * self.num_classes + pred[:, 0], minlength=self.num_classes ** 2)

    def result(self, count: int, plain: EvalResult | None = None) -> EvalResult:
        n = max(count, 1)
        return EvalResult(self.loss_sum / n, self.top1 / n, self.topk / n, count,
                          self.confusion.view(self.num_classes, self.num_classes).cpu(), plain)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mean: tuple[float, ...],
             std: tuple[float, ...], num_classes: int, batch_size: int = 1000,
             device: torch.device | str = "cpu", precision: str = "fp32", image_size: int | None = None,
             progress: bool = False, desc: str = "eval", tta: str = "none") -> EvalResult:
    """Evaluate on uint8 images (N, 3, H, W): normalise only (the eval transform), no augmentation.

    `image_size`: resize (bicubic, antialiased) when the model expects another size than the data has.
    `tta`: average the logits over flipped / shifted views (vitlab.train.tta); the result's `plain` holds
    the plain evaluation, taken from the first view (the image itself) of the same pass.
    The model is put in eval mode and returned to its previous mode afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    forward = inference_forward(model, precision)  # bf16-pure: a bf16 copy of the weights
    scores, plain = Scores(num_classes, device), Scores(num_classes, device) if tta != "none" else None
    try:
        for i in tqdm(range(0, labels.shape[0], batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress):
            x = normalize(images[i:i + batch_size].to(device), mean, std)  # (B, 3, H, W) float
            if image_size is not None and x.shape[-1] != image_size:
                x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True)
            y = labels[i:i + batch_size].to(device)
            logits = view_logits(forward, x, tta)  # [(B, K) fp32] per view
            scores.add(torch.stack(logits).mean(0), y)
            if plain is not None:
                plain.add(logits[0], y)
    finally:
        model.train(was_training)
    count = labels.shape[0]
    return scores.result(count, plain.result(count) if plain is not None else None)




def evaluate_run(run_dir: str | Path, *, data: str | Path | None = None, split: str = "test",
                 batch_size: int = 1000, device: str = "auto", progress: bool = True, tta: str = "none",
                 notes: list[str] | None = None) -> dict:
    """Evaluate a run dir's weights on `split` of the dataset it was trained on; write eval.json + figure.

    The dataset name comes from the run's train_config.json (CIFAR-10 when there is none, e.g. a converted
    model), the normalisation from its preprocessor_config.json, so the numbers match training.
    The run's lock is held throughout: a run that a live trainer holds is refused in one line, so the
    weights scored are the ones eval.json names (sha256, training step) and nothing lands in a busy run.
    Returns the eval.json content; `notes` collects what the opener assumed (e.g. no preprocessor_config.json).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"run dir {run_dir} not found" if not run_dir.exists() else
                          f"{run_dir} is a file; vitlab eval takes a model directory (eval.json is written there)")
    with RunLock(run_dir, command="vitlab eval"):
        return _evaluate_run(run_dir, data=data, split=split, batch_size=batch_size, device=device,
                             progress=progress, tta=tta, notes=notes if notes is not None else [])


def _evaluate_run(run_dir: Path, *, data, split: str, batch_size: int, device: str, progress: bool,
                  tta: str, notes: list[str]) -> dict:
    # before loading: the lock keeps the file as it is until we are done (a sharded HF dir has no single file)
    sha = weights_sha256(run_dir) if (run_dir / WEIGHTS_NAME).is_file() else None
    md = open_model_dir(run_dir)
    if not md.num_classes:
        raise VitlabError(f"{run_dir} holds a {md.what} without a classifier: nothing to evaluate"
                          + ("; `vitlab zeroshot` classifies by class names" if md.is_clip else ""))
    notes.extend(md.notes)
    model, pre = md.model, md.preprocess
    record = md.record or {}
    dataset = record.get("data", {}).get("dataset", "cifar10")
    if data is None:
        data = record.get("data", {}).get("root")  # the trainer's data dir, unless told otherwise
        if data is not None and not Path(data).exists():
            data = None  # moved machines: fall back to $VITLAB_DATA / the cache
    ds = load_dataset(dataset, data, split)
    if ds.num_classes != md.num_classes:
        raise VitlabError(f"{run_dir} predicts {md.num_classes} classes but {dataset} has {ds.num_classes}")
    dev = resolve_device(device)
    precision = record.get("plan", {}).get("precision", "fp32")
    res = evaluate(model.to(dev), ds.images, ds.labels, mean=pre.mean, std=pre.std, num_classes=ds.num_classes,
                   batch_size=batch_size, device=dev, precision=precision, image_size=pre.output_size,
                   progress=progress, desc=split, tta=tta)
    names = md.class_names
    classes = list(names) if names and len(names) == ds.num_classes else ds.classes  # the run's, else the data's
    out = {"run_dir": str(run_dir), "weights_sha256": sha, "step": _last_step(run_dir), "dataset": dataset,
           "split": split, "count": res.count, "loss": res.loss, "top1": res.top1, "top5": res.top5,
           "per_class": dict(zip(classes, res.per_class)), "classes": classes, "precision": precision, "tta": tta,
           **({"top1_without_tta": res.plain.top1} if res.plain is not None else {})}
    write_eval(run_dir / EVAL_NAME, out, res.confusion)
    out["confusion"] = res.confusion.tolist()
    plots, png = figures(), None
    if plots is not None:
        fig = plots.plot_confusion(res.confusion, classes, title=f"{run_dir.name}: {dataset} {split}, "
                                                                 f"top-1 {res.top1:.2%} ({res.count} images)")
        png = plots.save_figure(fig, run_dir / CONFUSION_PNG)
    out["confusion_png"] = str(png) if png else None
    return out


# ---- over several processes ------------------------------------------------------------------------------------------
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


def _last_step(run_dir: Path) -> int | None:
    """The training step of the saved weights: metrics.jsonl's last row (the trainer saves right after it)."""
    rows = read_metrics(run_dir / METRICS_NAME, [])
    step = rows[-1].get("step") if rows else None
    return step if isinstance(step, int) else None
