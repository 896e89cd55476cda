"""Train a small image-text model from scratch on CIFAR-10 with template captions, then test it zero-shot.

Every training image gets a caption made from a random template and its class name ("a blurry photo of a
cat."), tokenized by the byte-level tokenizer. The loss is CLIP's softmax or SigLIP's sigmoid; both towers
and everything else are the same, so runs differ only by the loss. Zero-shot accuracy on the test split uses
the class names and the template ensemble, never the labels during training of a classifier.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.model import CLIPModel, create_clip
from vitlab.clip.tokenizer import ByteTokenizer
from vitlab.clip.zeroshot import TEMPLATES, fill_template, zero_shot_accuracy, zero_shot_classifier
from vitlab.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, normalize, random_crop_flip
from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig
from vitlab.preprocess import ImagePreprocess
from vitlab.train.optim import WarmupCosine, create_optimizer
from vitlab.train.runtime import resolve_device
from vitlab.weights import write_json

LOSSES = ("siglip", "clip")
LOG_NAME = "train_log.json"


@dataclass
class ClipTrainConfig:
    """What `vitlab train-clip` runs. The default towers are small enough for a CPU (about 0.5 M parameters)."""

    loss: str = "siglip"  # siglip | clip
    batch_size: int = 256
    time_budget_min: float | None = 5.0  # stop after this much training time (None: only max_steps)
    max_steps: int | None = None  # stop after this many steps, whichever comes first
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    width: int = 96  # vision width = embedding size
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    text_width: int = 64
    text_depth: int = 2
    context_length: int = 48  # the longest caption, "a black and white photo of a automobile.", is 43 tokens
    templates: tuple[str, ...] = field(default=TEMPLATES)
    train_limit: int | None = None  # use only the first N training images (tests, quick looks)
    eval_limit: int | None = None  # zero-shot accuracy on the first N test images (None: all 10,000)
    seed: int = 0
    device: str = "auto"
    log_every: int = 5  # steps between loss-curve points

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise VitlabError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.batch_size < 2:
            raise VitlabError("--batch-size must be at least 2 (contrastive losses need negatives)")
        if self.time_budget_min is None and self.max_steps is None:
            raise VitlabError("give a time budget or a step limit")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise VitlabError("--time-budget must be positive (minutes)")
        if self.max_steps is not None and self.max_steps < 1:
            raise VitlabError("--max-steps must be positive")
        self.templates = tuple(self.templates)

    def model_config(self) -> CLIPConfig:
        vision = ViTConfig(image_size=32, patch_size=self.patch_size, num_classes=0, width=self.width,
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


def train_clip(cfg: ClipTrainConfig, *, data: str | Path | None = None, out: str | Path | None = None,
               progress: bool = True) -> dict:
    """Train, evaluate zero-shot, optionally save to `out`; returns the run summary (also in out/train_log.json)."""
    device = resolve_device(cfg.device)
    train = load_cifar10(data, "train")
    test = load_cifar10(data, "test")
    images, labels = train.images, train.labels
    if cfg.train_limit is not None:
        images, labels = images[:cfg.train_limit], labels[:cfg.train_limit]
    if images.shape[0] < cfg.batch_size:
        raise VitlabError(f"batch size {cfg.batch_size} is larger than the {images.shape[0]} training images")
    tokenizer = ByteTokenizer(context_length=cfg.context_length)
    captions = caption_tokens(tokenizer, train.classes, cfg.templates).to(device)  # (T, C, L)

    model = create_clip(cfg.model_config(), seed=cfg.seed).to(device)
    optimizer = create_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None

    curve, step, seen, train_s = [], 0, 0, 0.0
    order, cursor = torch.randperm(images.shape[0], generator=gen), 0
    bar = tqdm(total=round(budget_s) if budget_s else cfg.max_steps, desc=f"train-clip {cfg.loss}",
               disable=not progress, dynamic_ncols=True,  # counts seconds of the budget, or steps
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + ("s" if budget_s else "steps")
                          + " [{elapsed}<{remaining}{postfix}]")
    model.train()
    while (cfg.max_steps is None or step < cfg.max_steps) and (budget_s is None or train_s < budget_s):
        t0 = time.perf_counter()
        if cursor + cfg.batch_size > order.numel():  # new epoch: reshuffle, drop the ragged end
            order, cursor = torch.randperm(images.shape[0], generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = random_crop_flip(images[idx], padding=4, flip=True, generator=gen)
        x = normalize(x, CIFAR10_MEAN, CIFAR10_STD).to(device)  # (B, 3, 32, 32)
        template = torch.randint(len(cfg.templates), (idx.numel(),), generator=gen).to(device)
        ids = captions[template, labels[idx].to(device)]  # (B, L): a random caption of each image's class

        # time-based schedule: the cosine ends when the budget (or the step limit) is used up
        total = cfg.max_steps or 10**9
        if budget_s is not None and step > 0:
            total = min(total, step + int((budget_s - train_s) / (train_s / step)))
        WarmupCosine(cfg.lr, total_steps=max(total, step + 1), warmup_steps=cfg.warmup_steps).apply(optimizer, step)
        loss = model.loss(model.encode_image(x), model.encode_text(ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        step, seen = step + 1, seen + idx.numel()
        dt = time.perf_counter() - t0
        train_s += dt
        point = {"step": step, "seconds": round(train_s, 3), "images": seen, "loss": round(loss.item(), 5)}
        if step % cfg.log_every == 0 or step == 1:
            curve.append(point)
        bar.set_postfix(loss=f"{point['loss']:.4f}", img_s=f"{idx.numel() / dt:.0f}")
        bar.update(round(train_s) - bar.n if budget_s else 1)
    bar.close()
    if step and curve[-1]["step"] != step:
        curve.append(point)  # the curve always ends at the last step

    model.eval()
    eval_images, eval_labels = test.images, test.labels
    if cfg.eval_limit is not None:
        eval_images, eval_labels = eval_images[:cfg.eval_limit], eval_labels[:cfg.eval_limit]
    classifier = zero_shot_classifier(model, tokenizer, test.classes, cfg.templates)
    accuracy = zero_shot_accuracy(model, classifier, eval_images, eval_labels,
                                  transform=lambda b: normalize(b, CIFAR10_MEAN, CIFAR10_STD))
    summary = {"config": dataclasses.asdict(cfg), "steps": step, "images_seen": seen,
               "train_seconds": round(train_s, 2), "images_per_second": round(seen / max(train_s, 1e-9), 1),
               "final_loss": curve[-1]["loss"] if curve else None, "zero_shot_accuracy": accuracy,
               "eval_images": int(eval_images.shape[0]), "parameters": model.num_params(), "loss_curve": curve}
    if out is not None:
        save_run(model, tokenizer, out)
        write_json(Path(out) / LOG_NAME, summary)
    return summary


def save_run(model: CLIPModel, tokenizer: ByteTokenizer, out: str | Path) -> Path:
    """A directory `vitlab zeroshot` can use: weights, config, tokenizer and CIFAR preprocessing."""
    size = model.cfg.vision.image_size
    preprocess = ImagePreprocess(size=size, resize="square", crop_size=None, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return model.save_pretrained(out, tokenizer=tokenizer, preprocess=preprocess)
