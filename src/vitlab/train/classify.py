"""The ViT classification task (`vitlab train`): in-memory images, batched on-device augmentation, soft-target
cross-entropy, top-1/top-5 on test (and val), and a run dir `VisionTransformer.from_pretrained` loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vitlab.data import BatchAugment
from vitlab.model import VisionTransformer, create_model, parse_variant
from vitlab.speed import soft_cross_entropy
from vitlab.train.evaluate import evaluate
from vitlab.train.processor import write_preprocessor_config
from vitlab.train.recipes import TrainConfig
from vitlab.train.splits import load_splits
from vitlab.train.task import Batch, Task


def build_model(config: TrainConfig, *, image_size: int, num_classes: int) -> VisionTransformer:
    """The config's model at the data's image size and class count, initialised from `config.seed`."""
    cfg = parse_variant(config.model, **{"image_size": image_size, "num_classes": num_classes,
                                         "drop_path": config.drop_path, **config.model_args})
    return create_model(cfg, seed=config.seed)


class ClassifyTask(Task):
    """Images and labels of `config.dataset` held in memory (on the device), a seeded permutation per epoch
    (the loop's), crop/flip/policy/mixing on the device with the "augment" generator."""

    kind = "classify"
    command = "vitlab train"

    def __init__(self, config: TrainConfig, *, device: torch.device, data: str | Path | None = None,
                 download: bool = False) -> None:
        super().__init__(config, device=device)
        self.splits = load_splits(config, data, download=download)
        tr = self.splits.train
        self.images = tr.images.to(device)  # (N, 3, H, W) uint8, the whole training set
        self.labels = tr.labels.to(device)
        self.num_classes = tr.num_classes
        aug = dataclasses.replace(config.augment, mean=self.splits.mean, std=self.splits.std)
        self.augment = BatchAugment(aug, num_classes=self.num_classes)
        self.mixing = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mix_prob > 0
        self.generators = {"augment": torch.Generator(device=device).manual_seed(config.seed + 1)}

    @property
    def train_size(self) -> int:
        return len(self.splits.train)

    @property
    def eval_size(self) -> int:
        return len(self.splits.test) + (len(self.splits.val) if self.splits.val is not None else 0)

    def build_model(self) -> VisionTransformer:
        model = build_model(self.config, image_size=self.splits.train.image_size, num_classes=self.num_classes)
        model.set_grad_checkpointing(self.config.grad_checkpointing)
        return model

    def describe(self, model: VisionTransformer) -> str:
        return model.summary()

    def batch(self, index: torch.Tensor, step: int) -> Batch:
        y = self.labels[index]
        x, targets = self.augment(self.images[index], y, self.generators["augment"])  # (B, 3, H, W), (B, K)
        return Batch(x, targets, None if self.mixing else y, len(index))

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return soft_cross_entropy(logits, batch.targets)

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return None if batch.labels is None else (logits.argmax(1) == batch.labels).sum()

    def evaluate(self, model, *, precision: str, progress: bool = False, limit: int | None = None) -> dict:
        """test_* (and val_* with a held-out split): loss, top1, top5; `limit`: the first N test images only."""
        names = ["test"] if limit is not None or self.splits.val is None else ["test", "val"]
        out = {}
        for name in names:
            ds = getattr(self.splits, name)
            res = evaluate(model, ds.images[:limit], ds.labels[:limit], mean=self.splits.mean, std=self.splits.std,
                           num_classes=self.num_classes, batch_size=self.config.eval_batch_size,
                           device=self.device, precision=precision, progress=progress, desc=name)
            out.update(res.summary(f"{name}_"))
        return out

    def save(self, model: VisionTransformer, run_dir: Path) -> None:
        model.save_pretrained(run_dir, class_names=self.splits.classes)

    def write_run_files(self, run_dir: Path) -> None:
        write_preprocessor_config(run_dir, image_size=self.splits.train.image_size, mean=self.splits.mean,
                                  std=self.splits.std)

    def record(self, model: VisionTransformer) -> dict:
        return {"data": self.splits.info(self.config.dataset),
                "model": {"variant": self.config.model, "params": model.num_params(), "config": model.cfg.to_dict()}}
