"""Train a small image-text model from scratch on CIFAR-10 with template captions, then test it zero-shot.

Every training image gets a caption made from a random template and its class name ("a blurry photo of a
cat."), tokenized by the byte-level tokenizer. The loss is CLIP's softmax or SigLIP's sigmoid; both towers
and everything else are the same, so runs differ only by the loss. Zero-shot accuracy on the test split uses
the class names and the template ensemble, never the labels during training of a classifier.

It runs in the shared loop (`vitlab.train.loop.Trainer`) as a `ClipTask`: resume, the time budget,
metrics.jsonl, checkpoints, EMA and progress are those of `vitlab train`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.distributed import clip_loss_distributed, siglip_loss_distributed
from vitlab.clip.model import CLIPModel, create_clip
from vitlab.clip.tokenizer import ByteTokenizer
from vitlab.clip.zeroshot import TEMPLATES, fill_template, zero_shot_classifier
from vitlab.data import AugmentConfig, BatchAugment
from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.preprocess import ImagePreprocess
from vitlab.speed import resolve_precision
from vitlab.train.distributed import get_world_size
from vitlab.train.evaluate import evaluate_sharded
from vitlab.train.loop import TrainResult, resume, start
from vitlab.train.recipes import RunConfig
from vitlab.train.splits import load_splits
from vitlab.train.task import Batch, Task

LOSSES = ("siglip", "clip")
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# Random crop (pad 4) + flip; no label smoothing or mixing: the targets are captions, not one-hot labels.
CLIP_AUGMENT = AugmentConfig(policy="none", mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)


@dataclass(frozen=True)
class ClipTrainConfig(RunConfig):
    """What `vitlab train-clip` runs: the shared run fields (the flags of `vitlab train`), the loss and the
    towers. The default towers are small enough for a CPU (about 0.5 M parameters); the default run is a
    5-minute time budget (evaluations and saving included)."""

    loss: str = field(default="siglip", metadata={"help": "siglip (sigmoid, SigLIP) | clip (softmax, CLIP)"})
    width: int = field(default=96, metadata={"help": "vision width = embedding size"})
    depth: int = field(default=4, metadata={"help": "vision blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads of both towers"})
    patch_size: int = field(default=4, metadata={"help": "vision patch size"})
    text_width: int = field(default=64, metadata={"help": "text tower width"})
    text_depth: int = field(default=2, metadata={"help": "text blocks"})
    context_length: int = field(default=48, metadata={  # "a black and white photo of a automobile." is 43 tokens
        "help": "caption tokens the text tower reads (longer captions are cut)"})
    templates: tuple[str, ...] = field(default=TEMPLATES, metadata={
        "help": "caption templates for training and the zero-shot ensemble, e.g. 'a photo of a {}.'"})
    # shared fields with this run's defaults
    augment: AugmentConfig = field(default_factory=lambda: CLIP_AUGMENT, metadata={
        "help": "the image augmentation (crop and flip by default): its fields are flags of their own"})
    time_budget: float = field(default=5.0, metadata={
        "help": "minutes from the start of the command to its end, evaluation and saving included; 0: run --epochs"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate, reached after warmup"})
    warmup_epochs: float = field(default=0.1, metadata={  # ~20 steps of 256 on CIFAR-10
        "help": "epochs of linear learning-rate warmup from 0"})
    betas: tuple[float, float] = field(default=(0.9, 0.98), metadata={"help": "AdamW's beta1 beta2"})
    grad_clip: float = field(default=0.0, metadata={"help": "max global gradient norm; 0: off"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast) | auto"})
    eval_batch_size: int = field(default=500, metadata={"help": "images per evaluation batch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise VitlabError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.batch_size < 2:
            raise VitlabError("--batch-size must be at least 2 (contrastive losses need negatives)")
        if self.precision not in ("auto", *ClipTask.precisions):
            raise VitlabError(f"train-clip runs in precision fp32, bf16 or auto, not {self.precision!r}")
        if not self.templates:
            raise VitlabError("no caption templates given")
        for t in self.templates:
            fill_template(t, "x")  # each must have a place for the class name

    def model_config(self, image_size: int = 32) -> CLIPConfig:
        vision = ViTConfig(image_size=image_size, patch_size=self.patch_size, num_classes=0, width=self.width,
                           depth=self.depth, heads=self.heads, mlp_dim=4 * self.width, class_token=False,
                           pooling="gap", norm_eps=1e-6)
        clip = self.loss == "clip"  # CLIP: causal text, pooled at EOS; SigLIP: bidirectional, last token
        text = TextConfig(vocab_size=ByteTokenizer.vocab_size, context_length=self.context_length,
                          width=self.text_width, depth=self.text_depth, heads=self.heads, mlp_dim=4 * self.text_width,
                          causal=clip, pooling="eos" if clip else "last", eos_token_id=ByteTokenizer.EOS)
        return CLIPConfig(vision=vision, text=text, kind=self.loss, embed_dim=self.width)


def caption_tokens(tokenizer: ByteTokenizer, classes: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """Every (template, class) caption tokenized once: (T, C, L)."""
    texts = [fill_template(t, c) for t in templates for c in classes]
    return tokenizer(texts).view(len(templates), len(classes), -1)


class ImageTextEncoder(nn.Module):
    """(images (B, 3, H, W), token ids (B, L)) -> image and text embeddings stacked (2, B, E): the forward one
    training step runs (`vitlab.speed.TrainStep` passes one input and takes one output tensor)."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, ids = inputs
        return torch.stack([self.clip.encode_image(images), self.clip.encode_text(ids)])


class ZeroShotHead(nn.Module):
    """A CLIP model as a classifier over fixed class embeddings (C, E): images -> (B, C) logits."""

    def __init__(self, clip: CLIPModel, classifier: torch.Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("classifier", classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.logits(self.clip.encode_image(x), self.classifier)


class ClipTask(Task):
    """Images of `config.dataset` in memory with a random template caption of their class per step; the
    model's own loss (softmax CLIP or sigmoid SigLIP); zero-shot top-1/top-5/cross-entropy on test."""

    kind = "clip"
    command = "vitlab train-clip"
    config_class = ClipTrainConfig
    precisions = ("fp32", "bf16")  # the (images, ids) input has no single dtype for bf16-pure's cast

    def __init__(self, config: ClipTrainConfig, *, device: torch.device, data: str | Path | None = None,
                 download: bool | None = None) -> None:
        super().__init__(config, device=device)
        self.splits = load_splits(config, data, download=download)
        tr = self.splits.train
        self.images = tr.images.to(device)  # (N, 3, H, W) uint8
        self.labels = tr.labels.to(device)
        aug = dataclasses.replace(config.augment, mean=self.splits.mean, std=self.splits.std)
        self.augment = BatchAugment(aug, num_classes=tr.num_classes)
        self.tokenizer = ByteTokenizer(context_length=config.context_length)
        self.captions = caption_tokens(self.tokenizer, tr.classes, config.templates).to(device)  # (T, C, L)
        self.generators = {"augment": torch.Generator(device=device).manual_seed(config.seed + 1)}
        self.model: CLIPModel | None = None  # set by build_model: the loss needs its temperature (and bias)

    @property
    def train_size(self) -> int:
        return len(self.splits.train)

    @property
    def eval_size(self) -> int:
        return len(self.splits.test)

    def resolve_precision(self, precision: str) -> str:
        if precision == "auto":  # where bf16-pure would be chosen, bf16 autocast is this task's fast choice
            precision = {"bf16-pure": "bf16"}.get(resolve_precision("auto", device=self.device), "fp32")
        return super().resolve_precision(precision)

    def build_model(self) -> CLIPModel:
        self.model = create_clip(self.config.model_config(self.splits.train.image_size), seed=self.config.seed)
        return self.model

    def train_module(self, model: CLIPModel) -> nn.Module:
        return ImageTextEncoder(model)

    def describe(self, model: CLIPModel) -> str:
        v, t = model.cfg.vision, model.cfg.text
        return (f"{model.kind} vision {v.width}w {v.depth}d /{v.patch_size}, text {t.width}w {t.depth}d "
                f"({model.num_params() / 1e6:.2f}M params)")

    def batch(self, index: torch.Tensor, step: int, *, size: int | None = None) -> Batch:
        y = self.labels[index]
        g = self.generators["augment"]
        x, _ = self.augment(self.images[index], y, g)  # (B, 3, H, W) normalised
        template = torch.randint(self.captions.shape[0], (len(index),), generator=g, device=self.device)
        ids = self.captions[template, y]  # (B, L): a random caption of each image's class
        return Batch((x, ids), None, None, len(index))

    def loss(self, embeds: torch.Tensor, batch: Batch) -> torch.Tensor:
        image_embeds, text_embeds = embeds.float()  # (2, B, E) -> (B, E), (B, E)
        m = self.model
        if get_world_size() > 1:  # this rank's share of the global batch's loss: the other ranks' texts too
            if m.logit_bias is None:
                return clip_loss_distributed(image_embeds, text_embeds, m.logit_scale)
            return siglip_loss_distributed(image_embeds, text_embeds, m.logit_scale, m.logit_bias)
        return m.loss(image_embeds, text_embeds)

    @torch.no_grad()
    def evaluate(self, model: CLIPModel, *, precision: str, progress: bool = False, limit: int | None = None,
                 final: bool = False) -> dict:
        """Zero-shot on test with the template ensemble: top-1, top-5 and cross-entropy over the class logits."""
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module's encoders
        was_training = model.training
        model.eval()
        classifier = zero_shot_classifier(model, self.tokenizer, self.splits.classes, self.config.templates)
        model.train(was_training)
        test = self.splits.test
        res = evaluate_sharded(ZeroShotHead(model, classifier), test.images[:limit], test.labels[:limit],
                               mean=self.splits.mean, std=self.splits.std, num_classes=test.num_classes,
                               batch_size=self.config.eval_batch_size, device=self.device, precision=precision,
                               progress=progress, desc="zero-shot")
        return res.summary("test_")

    def save(self, model: CLIPModel, run_dir: Path) -> None:
        save_run(model, self.tokenizer, run_dir, mean=self.splits.mean, std=self.splits.std)

    def record(self, model: CLIPModel) -> dict:
        return {"data": self.splits.info(self.config.dataset),
                "model": {"params": model.num_params(), "config": model.cfg.to_dict()}}


def save_run(model: CLIPModel, tokenizer: ByteTokenizer, out: str | Path, *, mean: tuple[float, ...],
             std: tuple[float, ...]) -> Path:
    """A directory `vitlab zeroshot` can use: weights, config, tokenizer and the training normalisation."""
    size = model.cfg.vision.image_size
    preprocess = ImagePreprocess(size=size, resize="square", crop_size=None, mean=mean, std=std)
    return model.save_pretrained(out, tokenizer=tokenizer, preprocess=preprocess)


def train_clip(config: ClipTrainConfig, *, out: str | Path | None = None, data: str | Path | None = None,
               device: str = "auto", progress: bool = True, download: bool | None = None,
               log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> dict:
    """Train into the run dir `out` (a temporary one, deleted afterwards, when None); returns `summary`."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="vitlab-train-clip-") as tmp:
            return train_clip(config, out=Path(tmp) / "run", data=data, device=device, progress=progress,
                              download=download, log=log, started_at=started_at)
    return summary(start(ClipTask, config, out, data=data, device=device, progress=progress, download=download,
                         log=log, started_at=started_at))


def resume_clip(run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto", progress: bool = True,
                log: Callable[[str], None] = tqdm.write, started_at: float | None = None) -> dict:
    """Continue an interrupted `train-clip` run from its last checkpoint, exactly as if it had never stopped."""
    return summary(resume(ClipTask, run_dir, data=data, device=device, progress=progress, log=log,
                          started_at=started_at))


def summary(result: TrainResult) -> dict:
    """The run in one dict: steps, images, speed, final loss, zero-shot accuracy and the loss curve."""
    final, task = result.final, result.task
    config, batch = task.config, result.global_batch or task.config.batch_size  # images per step, all processes
    if not final:
        raise VitlabError(f"{result.run_dir}: no epoch was completed")
    steps, train_s, prev = final["step"], 0.0, 0
    for row in result.metrics:  # training time alone: each epoch's images over its speed
        train_s += (row["step"] - prev) * batch / max(row["images_per_sec"], 1e-9)
        prev = row["step"]
    curve = [{"step": r["step"], "seconds": r["elapsed_s"], "loss": r["loss"]} for r in result.steps]
    return {"config": config.to_dict(), "run_dir": str(result.run_dir), "steps": steps,
            "images_seen": steps * batch, "train_seconds": round(train_s, 2),
            "images_per_second": round(steps * batch / max(train_s, 1e-9), 1),
            "elapsed_seconds": final["elapsed_s"], "final_loss": curve[-1]["loss"] if curve else None,
            "zero_shot_accuracy": final["test_top1"], "zero_shot_top5": final["test_top5"],
            "eval_images": len(task.splits.test), "dataset": DATASET_NAMES.get(config.dataset, config.dataset),
            "parameters": task.model.num_params(), "loss_curve": curve}
