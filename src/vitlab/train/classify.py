"""The classification task (`vitlab train`) of any registered model family (ViT, Swin: vitlab.model.registry) or
the CNN teacher: in-memory images, batched on-device augmentation, soft-target cross-entropy, top-1/top-5 on test
(and val), and a run dir `vitlab.model.load_pretrained` loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from vitlab.data import BatchAugment
from vitlab.distill import TeacherConfig, TeacherNet, distillation_loss
from vitlab.errors import VitlabError
from vitlab.model import ViTConfig, create_model, model_config
from vitlab.model.hub import seeded
from vitlab.rundir import write_preprocessor_config
from vitlab.speed import inference_forward, soft_cross_entropy
from vitlab.train.evaluate import evaluate_sharded
from vitlab.train.finetune import init_model
from vitlab.train.recipes import TrainConfig
from vitlab.train.resize import ResizeSchedule
from vitlab.train.splits import folder_image_size, load_splits, stream_splits
from vitlab.train.task import Batch, Task
from vitlab.train.tta import TTA_VIEWS


def is_cnn(model: str) -> bool:
    return model == "cnn" or model.startswith("cnn-")


def check_model(config: TrainConfig) -> None:
    """Fail on a bad model name or model_args, or an option the model cannot train with, before any data is
    loaded (a fine-tuning run's model is the --init source's: `build_model` checks it)."""
    if is_cnn(config.model):
        TeacherConfig(widths=cnn_widths(config.model), **config.model_args)
    elif not config.init:
        check_options(model_config(config.model, **config.model_args), config)


def check_options(cfg, config: TrainConfig) -> None:
    """Options only a ViT supports fail in one line for another family (Swin), naming the option."""
    if isinstance(cfg, ViTConfig) or not config.resize_schedule:
        return
    raise VitlabError(f"--resize-schedule {config.resize_schedule!r}: {cfg.name or type(cfg).__name__} trains at "
                      f"one image size (its attention windows and masks are laid out for one grid); drop it "
                      f"(--resize-schedule '') or use a recipe without it, e.g. --recipe swin-sprint")


def cnn_widths(model: str) -> tuple[int, int, int]:
    """"cnn" -> the default widths; "cnn-32-64-128" -> (32, 64, 128)."""
    try:
        widths = tuple(int(w) for w in model.split("-")[1:]) or TeacherConfig.widths
    except ValueError:
        widths = ()
    if len(widths) != 3:
        raise VitlabError(f"model {model!r}: the CNN teacher is 'cnn' or 'cnn-W1-W2-W3', e.g. 'cnn-32-64-128'")
    return widths


def build_model(config: TrainConfig, *, image_size: int, num_classes: int) -> nn.Module:
    """The config's model (any registered variant: "conv128", "swin-cifar", ...) at the data's image size and
    class count, initialised from `config.seed`.

    `model="cnn"` (or "cnn-32-64-128" for the widths) is the CNN teacher of vitlab.distill instead.
    """
    if is_cnn(config.model):
        with seeded(config.seed):
            return TeacherNet(TeacherConfig(widths=cnn_widths(config.model), num_classes=num_classes,
                                            name=config.model, **config.model_args))
    cfg = model_config(config.model, **{"image_size": image_size, "num_classes": num_classes,
                                        "drop_path": config.drop_path, **config.model_args})
    check_options(cfg, config)
    return create_model(cfg, seed=config.seed)


class ClassifyTask(Task):
    """Images and labels of `config.dataset` held in memory (on the device), a seeded permutation per epoch
    (the loop's), crop/flip/policy/mixing on the device with the "augment" generator."""

    kind = "classify"
    command = "vitlab train"
    provenance: dict | None = None  # where fine-tuning weights came from (vitlab.train.finetune.init_from)

    def __init__(self, config: TrainConfig, *, device: torch.device, data: str | Path | None = None,
                 download: bool | None = None, teacher: str | Path | None = None) -> None:
        """`teacher`: the CNN teacher's run dir (default `config.teacher`; a "stage" teacher's is given here)."""
        super().__init__(config, device=device)
        self.splits = stream_splits(config, data) if config.data_mode == "stream" else \
            load_splits(config, data, download=download, image_size=folder_image_size(config),
                        allow_empty_classes=config.allow_empty_classes)
        tr = self.splits.train
        self.images = tr.images.to(device)  # (N, 3, H, W) uint8, the whole training set
        self.labels = tr.labels.to(device)
        self.num_classes = tr.num_classes
        aug = dataclasses.replace(config.augment, mean=self.splits.mean, std=self.splits.std)
        self.augment = BatchAugment(aug, num_classes=self.num_classes)
        self.mixing = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mix_prob > 0
        self.generators = {"augment": torch.Generator(device=device).manual_seed(config.seed + 1)}
        self.resize = ResizeSchedule.parse(config.resize_schedule, full=tr.image_size) \
            if config.resize_schedule else None
        self.total_steps, self.steps_per_epoch = 1, 1  # set by the loop (set_schedule)
        if aug.alternate_flip:  # which images the first epoch flips; the next epochs alternate
            self.augment = BatchAugment(dataclasses.replace(aug, flip=False), num_classes=self.num_classes)
            g = torch.Generator().manual_seed(config.seed + 2)
            self.first_flip = (torch.rand(len(tr), generator=g) < 0.5).to(device)
        self.teacher = self.teacher_forward = None
        teacher = teacher or config.teacher
        if teacher:
            if teacher == "stage":
                raise VitlabError("teacher 'stage' is trained by vitlab.train.train(); give ClassifyTask its run dir")
            self.teacher = TeacherNet.from_pretrained(teacher, map_location=device)
            if self.teacher.cfg.num_classes != self.num_classes:
                raise VitlabError(f"teacher {teacher} predicts {self.teacher.cfg.num_classes} classes, "
                                  f"the data has {self.num_classes}")

    @property
    def train_size(self) -> int:
        return len(self.splits.train)

    @property
    def eval_size(self) -> int:
        return len(self.splits.test) + (len(self.splits.val) if self.splits.val is not None else 0)

    def build_model(self) -> nn.Module:
        if self.config.init:  # fine-tuning: the source's architecture and weights (vitlab.train.finetune)
            model, self.provenance = init_model(self.config, image_size=self.splits.train.image_size,
                                                num_classes=self.num_classes)
            check_options(model.cfg, self.config)
        else:
            model = build_model(self.config, image_size=self.splits.train.image_size, num_classes=self.num_classes)
        if isinstance(model, TeacherNet):  # its fixed first layer whitens this data's 2x2 patches
            model.init_whitening(self.augment.eval_transform(self.images[:5000].cpu()))
            return model
        model.set_grad_checkpointing(self.config.grad_checkpointing)
        if self.teacher is not None and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # with a distillation token: both heads reach the loss; a model
            # without one (a Swin) distils through its single head (vitlab.distill.distillation_loss)
        return model

    def describe(self, model: nn.Module) -> str:
        return model.summary()

    def set_schedule(self, *, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def input_sizes(self) -> list[int]:
        return self.resize.sizes if self.resize is not None else [self.splits.train.image_size]

    def step_size(self, step: int) -> int:
        """The image size of step `step` (progressive resizing), the data's own without a schedule."""
        return self.resize.size_at(step, self.total_steps) if self.resize is not None else \
            self.splits.train.image_size

    def final_eval_passes(self) -> int:
        return TTA_VIEWS[self.config.tta]

    def layer_decay(self) -> float | None:
        return self.config.layer_decay or None

    def work(self, step: int, total: int, cost: dict[int, float]) -> float:
        """Steps `step`..`total`-1 in units of a full-size step, for the time budget."""
        if self.resize is None:
            return float(total - step)
        return self.resize.work(step, total, cost)

    def batch(self, index: torch.Tensor, step: int, *, size: int | None = None) -> Batch:
        """Augmented (B, 3, H, W) images and soft targets (B, K); at `size` (else the schedule's) px; with a
        teacher, the targets are (soft targets, teacher logits on the full-size augmented images)."""
        y, images = self.labels[index], self.images[index]
        if self.config.augment.alternate_flip:
            flip = self.first_flip[index] ^ bool((step // self.steps_per_epoch) % 2)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        x, targets = self.augment(images, y, self.generators["augment"])  # (B, 3, H, W), (B, K)
        if self.teacher is not None:
            if self.teacher_forward is None:  # a bf16 copy on CPU: the teacher only ever infers
                self.teacher_forward = inference_forward(self.teacher, self.resolve_precision(self.config.precision))
            targets = (targets, self.teacher_forward(x))
        if self.resize is not None:
            x = self.resize.resize(x, size or self.step_size(step))
        return Batch(x, targets, None if self.mixing else y, len(index))

    def loss(self, outputs, batch: Batch) -> torch.Tensor:
        if self.teacher is None:
            return soft_cross_entropy(outputs, batch.targets)
        targets, teacher_logits = batch.targets
        c = self.config
        return distillation_loss(outputs, targets, teacher_logits, mode=c.distill, alpha=c.distill_alpha,
                                 tau=c.distill_tau)

    def correct(self, outputs, batch: Batch) -> torch.Tensor | None:
        logits = outputs[0] if isinstance(outputs, tuple) else outputs  # distilled training: the class head
        return None if batch.labels is None else (logits.argmax(1) == batch.labels).sum()

    def evaluate(self, model, *, precision: str, progress: bool = False, limit: int | None = None,
                 final: bool = False) -> dict:
        """test_* (and val_* with a held-out split): loss, top1, top5; `limit`: the first N test images only.
        The `final` evaluation also reports test_top1_tta / test_loss_tta with the config's TTA."""
        names = ["test"] if limit is not None or self.splits.val is None else ["test", "val"]
        tta = self.config.tta if final else "none"
        out = {}
        for name in names:
            ds = getattr(self.splits, name)
            res = evaluate_sharded(model, ds.images[:limit], ds.labels[:limit], mean=self.splits.mean,
                                   std=self.splits.std, num_classes=self.num_classes,
                                   batch_size=self.config.eval_batch_size, device=self.device,
                                   precision=precision, progress=progress, desc=name, tta=tta)
            out.update(res.metrics(f"{name}_"))
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        model.save_pretrained(run_dir, class_names=self.splits.classes)

    def write_run_files(self, run_dir: Path) -> None:
        write_preprocessor_config(run_dir, image_size=self.splits.train.image_size, mean=self.splits.mean,
                                  std=self.splits.std)

    def record(self, model: nn.Module) -> dict:
        """`model.model_type` says which class `model.config` belongs to (vitlab.model.registry.model_class)."""
        return {"data": self.splits.info(self.config.dataset),
                "model": {"variant": self.config.model, "model_type": model.model_type, "params": model.num_params(),
                          "config": model.cfg.to_dict()},
                **({"init": self.provenance} if self.provenance else {})}
