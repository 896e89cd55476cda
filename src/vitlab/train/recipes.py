"""`RunConfig` (what every run of the shared loop reads), `TrainConfig` (+ the model: a ViT, a Swin or the CNN
teacher), and the ONE table of named recipes.

A recipe is a complete `TrainConfig`; the CLI (`--epochs --lr --model ...`) overrides single fields with
`resolve_recipe(name, **overrides)`. The resolved config is saved as `train_config.json` in the run dir,
which is all `--resume` needs to rebuild the run.

Accuracy per minute on a CPU is won by small models that see many epochs, not by wide ones that see few,
so the recipes below are narrow and shallow, sized so the epochs fit the time the recipe promises
(throughput and time-to-accuracy per recipe: benchmarks/RESULTS.md). On a GPU or a bigger CPU they simply
finish sooner; `--time-budget` instead fits the steps to the clock.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from vitlab.data import AugmentConfig
from vitlab.data.stream import DATA_MODES
from vitlab.distill.losses import DISTILL_MODES
from vitlab.errors import VitlabError, check_fields
from vitlab.speed import PRECISIONS
from vitlab.train.optim import DECAYS, OPTIMIZERS
from vitlab.train.resize import parse_resize_schedule
from vitlab.train.tta import TTA_MODES

ON_NONFINITE = ("stop", "skip")  # what a NaN/Inf loss does (vitlab.train.guard): the option lives with the config


@dataclass(frozen=True)
class RunConfig:
    """What every run of the shared loop (`vitlab.train.loop.Trainer`) reads: data selection, optimisation,
    execution. `TrainConfig` (ViT classification) and `ClipTrainConfig` add their model's fields.
    Field names are the CLI flags with dashes turned into underscores, the same in `train` and `train-clip`."""

    # ---- data ------------------------------------------------------------------------------------------
    dataset: str = field(default="cifar10", metadata={
        "help": "cifar10 | cifar100 | folder (an image folder: --data DIR)"})
    val_split: float = field(default=0.0, metadata={
        "help": "fraction of train held out (seeded) as a validation set evaluated each epoch, e.g. 0.1"})
    train_subset: int = field(default=0, metadata={
        "help": "train on the first N images (after the validation split) only, for quick checks; 0: all"})
    test_subset: int = field(default=0, metadata={"help": "evaluate on the first N test images only; 0: all"})
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={
        "help": "the augmentation: its fields are flags of their own; mean/std are set from the dataset"})
    # ---- optimisation ----------------------------------------------------------------------------------
    epochs: float = field(default=10, metadata={
        "help": "passes over the training set (fractions allowed): epochs * steps_per_epoch optimizer steps"})
    max_steps: int = field(default=0, metadata={
        "help": "stop after this many optimizer steps (the schedule ends there too); 0: off"})
    batch_size: int = field(default=256, metadata={"help": "images per optimizer step of each process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate, reached after warmup"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "epochs of linear learning-rate warmup from 0"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "decoupled weight decay (AdamW); never on norms, biases, tokens, positions"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam's beta1 beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm; 0: off"})
    on_nonfinite: str = field(default="stop", metadata={
        "help": "stop: a NaN/Inf loss or gradient norm ends the run, exit 2, its last good checkpoint kept | "
                "skip: skip that step and halve the learning rate (5 in a row: stop)"})
    ema: float = field(default=0.0, metadata={
        "help": "EMA decay of the weights, e.g. 0.999; 0: off. The EMA is evaluated and saved"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw | muon (torch's Muon for the hidden matrices, q/k/v apart; AdamW for the rest)"})
    decay: str = field(default="cosine", metadata={
        "help": "cosine | linear | onecycle: the learning rate's decay to --min-lr after warmup (linear: robust "
                "under a time budget; onecycle: ConvMixer's, up to --lr over the first 2/5 of the run in place of "
                "--warmup-epochs, down to lr/20 at 4/5, then to --min-lr)"})
    # ---- execution -------------------------------------------------------------------------------------
    precision: str = field(default="auto", metadata={
        "help": f"{' | '.join(PRECISIONS)}: bf16 = autocast; auto = bf16-pure on CPUs with bf16 matmuls, bf16 "
                "autocast on GPUs (vitlab.speed.resolve_precision)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    eval_batch_size: int = field(default=1000, metadata={"help": "images per evaluation batch"})
    time_budget: float = field(default=0.0, metadata={
        "help": "minutes from the start of the command to its end (evaluation and saving included): steps and "
                "schedule are fitted to them instead of --epochs; 0: off"})
    log_every: int = field(default=10, metadata={
        "help": "optimizer steps between points of the per-step loss log (steps.jsonl)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, data order and augmentation"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write TensorBoard event files to RUN_DIR/tb (pip install 'vitlab[tensorboard]')"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "also checkpoint every N optimizer steps inside an epoch (long epochs; a torchrun restart goes "
                "on from there); 0: at epoch ends only"})

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise VitlabError(f"invalid training config: {msg}")

        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.batch_size > 0 and self.eval_batch_size > 0, "batch sizes must be > 0")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr,
             f"need lr > 0 and 0 <= min_lr <= lr, got lr {self.lr}, min_lr {self.min_lr}")
        need(self.warmup_epochs >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
             "warmup_epochs, weight_decay and grad_clip must be >= 0")
        need(0 <= self.ema < 1, f"ema decay must be in [0, 1), got {self.ema}")
        need(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}")
        need(self.train_subset >= 0 and self.test_subset >= 0 and self.time_budget >= 0 and self.max_steps >= 0,
             "train_subset, test_subset, time_budget and max_steps must be >= 0")
        need(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        need(self.on_nonfinite in ON_NONFINITE,
             f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, not {self.on_nonfinite!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        need(self.decay in DECAYS, f"decay must be one of {', '.join(DECAYS)}, not {self.decay!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of `to_dict` (JSON turned tuples into lists and the augmentation into a dict)."""
        check_fields(cls, d, "training-config")
        d = dict(d)
        if isinstance(d.get("augment"), dict):
            aug = d["augment"]
            d["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
        for f in dataclasses.fields(cls):
            if isinstance(d.get(f.name), list) and isinstance(f.default, tuple):
                d[f.name] = tuple(d[f.name])
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A classification run (`vitlab train`): the shared fields plus the model (ViT, Swin, CNN teacher)."""

    # ---- model: a variant from vitlab.model's table, optionally reshaped by model_args -----------------
    model: str = field(default="tutorial", metadata={
        "help": "model variant, e.g. tutorial, cifar128, conv128, Ti/4, S/4, swin-cifar; cnn or cnn-W1-W2-W3 for "
                "the CNN teacher"})
    model_args: dict = field(default_factory=dict, metadata={
        "help": "override of the model's config (ViTConfig, SwinConfig), KEY=VALUE, e.g. width=96 or "
                "embed_dim=96 (repeatable)"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block (linear from 0)"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute block activations in backward: less memory, ~30% slower"})
    # ---- speedrun levers (issue 12) --------------------------------------------------------------------
    resize_schedule: str = field(default="", metadata={
        "help": "progressive resizing, SIZE:UNTIL,...: e.g. 16:0.4,24:0.7 trains at 16 px for the first 40% of "
                "the steps, at 24 px until 70%, then at full size"})
    teacher: str = field(default="", metadata={
        "help": "distil from this CNN teacher run dir (vitlab train --recipe teacher), or 'stage' to train one "
                "first, inside the time budget"})
    teacher_recipe: str = field(default="teacher", metadata={
        "help": "the recipe a --teacher stage teacher trains with"})
    teacher_share: float = field(default=0.2, metadata={
        "help": "with --teacher stage under a time budget: the budget's share the teacher gets"})
    distill: str = field(default="hard", metadata={
        "help": "hard | soft (DeiT); through the model's distillation token when it has one"})
    distill_alpha: float = field(default=0.5, metadata={"help": "soft distillation: weight of the teacher term"})
    distill_tau: float = field(default=1.0, metadata={"help": "soft distillation: temperature"})
    tta: str = field(default="none", metadata={
        "help": "none | flip | flip-translate: the final evaluation also reports test_top1_tta"})
    # ---- scale-out (issue 13): image folders read from disk, fine-tuning -------------------------------
    data_mode: str = field(default="auto", metadata={
        "help": "image folders: memory (decoded once, held in memory) | stream (read from disk by DataLoader "
                "workers, for folders larger than memory) | auto (memory if it fits --memory-share)"})
    image_size: int = field(default=0, metadata={
        "help": "image folders: side the images are resized / cropped to; 0: 32"})
    workers: int = field(default=2, metadata={"help": "--data-mode stream: decoding processes per training process"})
    allow_empty_classes: bool = field(default=False, metadata={
        "help": "image folders: keep a train/ class folder with no images as a class (warned) instead of refusing"})
    memory_share: float = field(default=0.5, metadata={
        "help": "--data-mode auto: stream when the decoded folder would need more than this share of the "
                "available memory"})
    init: str = field(default="", metadata={
        "help": "fine-tune from pretrained weights: a vitlab run or model dir, a Hugging Face ViT / CLIP / SigLIP "
                "dir, or a timm .safetensors file (with timm's config.json, or --variant); the head is replaced "
                "for new classes, positions resampled for a new image size"})
    variant: str = field(default="", metadata={
        "help": "with --init of a bare timm .safetensors file (no config.json): its vitlab variant, e.g. Ti/16"})
    layer_decay: float = field(default=0.0, metadata={
        "help": "layer-wise learning-rate decay, e.g. 0.75: each layer below the head learns 0.75x slower; 0: off"})
    freeze_backbone: bool = field(default=False, metadata={
        "help": "with --init: train the classifier only (a linear probe of the init weights)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.drop_path < 1:
            raise VitlabError(f"invalid training config: drop_path must be in [0, 1), got {self.drop_path}")
        if self.distill not in DISTILL_MODES or not 0 <= self.distill_alpha <= 1 or self.distill_tau <= 0:
            raise VitlabError(f"invalid training config: distill must be one of {', '.join(DISTILL_MODES)}, "
                              f"distill_alpha in [0, 1], distill_tau > 0")
        if self.tta not in TTA_MODES:
            raise VitlabError(f"invalid training config: tta must be one of {', '.join(TTA_MODES)}, not {self.tta!r}")
        if not 0 < self.teacher_share < 1:
            raise VitlabError(f"invalid training config: teacher_share must be in (0, 1), got {self.teacher_share}")
        parse_resize_schedule(self.resize_schedule)  # a bad schedule fails now
        check_scaleout(self)


def check_scaleout(c: TrainConfig) -> None:
    """The issue-13 fields of a TrainConfig (data mode, fine-tuning) are consistent."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise VitlabError(f"invalid training config: {msg}")

    need(c.data_mode in DATA_MODES, f"data_mode must be one of {', '.join(DATA_MODES)}, not {c.data_mode!r}")
    need(c.image_size >= 0 and c.workers >= 0, "image_size and workers must be >= 0")
    need(c.dataset == "folder" or c.image_size in (0, 32), "image_size sets the side of image folders' images; "
         f"{c.dataset} images are 32x32")
    need(0 < c.memory_share <= 1, f"memory_share must be in (0, 1], got {c.memory_share}")
    need(0 <= c.layer_decay <= 1, f"layer_decay must be in [0, 1] (0: off), got {c.layer_decay}")
    need(c.init or not (c.freeze_backbone or c.variant),
         "freeze_backbone and variant describe the init weights: give init (--init SRC)")


# Light augmentation for short runs: crop + flip + label smoothing. Policies and mixing regularise, which a
# model that sees the data only ~10-30 times does not need yet; they start paying after ~50+ epochs.
_LIGHT = AugmentConfig(policy="none", mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)

RECIPES: dict[str, TrainConfig] = {
    # Tin Nguyen's blog post "Implementing Vision Transformer (ViT) from Scratch": 48 wide, 4 deep, 4 heads,
    # MLP 192, 4x4 patches (0.12M parameters). Adam at 1e-3, batch 256, flips only, no label smoothing, no
    # weight decay: the setup reported at ~64% after 50-100 epochs at a constant rate. A one-epoch warmup +
    # cosine to zero (same peak) converges in fewer epochs, so 30 (benchmarks/cifar10_time_to_accuracy.py
    # checks the 64%).
    "tutorial": TrainConfig(
        model="tutorial", epochs=30, batch_size=256, lr=1e-3, warmup_epochs=1, weight_decay=0.0, grad_clip=0.0,
        augment=AugmentConfig(crop_padding=0, policy="none", mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0),
    ),
    # The time-budget recipes (issue 12). Each feature measured alone over the old `fast` at equal epochs
    # (ablation table in benchmarks/RESULTS.md): a conv stem (CCT-like, ~23% fewer img/s) learns far more per
    # image than 4x4 patchify, and Muon for the hidden matrices adds the next largest step; sequence pooling
    # and GAP did not pay at these lengths. Flip TTA is nearly free, flip + translate pays where the final
    # evaluation is a small share of the run. `*-pure` keep the patchify ViT's best.
    # 3 minutes (`vitlab train --time-budget 3` picks it): the conv-stem 128/6 model, the first half of the
    # steps on 16 px images (~3x cheaper per step here, so ~1.6x the steps in the same 3 minutes).
    "sprint": TrainConfig(
        model="conv128", optimizer="muon", epochs=3, batch_size=256, lr=2e-3, warmup_epochs=0.5,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip", time_budget=3, resize_schedule="16:0.5",
    ),
    "sprint-pure": TrainConfig(
        model="cifar128", optimizer="muon", epochs=3, batch_size=256, lr=2e-3, warmup_epochs=0.5,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip", time_budget=3, resize_schedule="16:0.5",
    ),
    # DEFAULT, ~15 minutes here (a fixed length: 8 epochs; --time-budget 15 fits it to the clock instead):
    # the conv-stem 128/6 model (MLP ratio 2 as the 93.6% CIFAR ViT; 4 heads of 32) with Muon. Wider sees too
    # few epochs in 15 minutes. lr 2e-3 (batch 256) after a one-epoch warmup: a short run needs the large
    # steps; wd 0.05 and label smoothing 0.1 as DeiT; random crop (pad 4) + flip only.
    "fast": TrainConfig(
        model="conv128", optimizer="muon", epochs=8, batch_size=256, lr=2e-3, warmup_epochs=1,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip-translate",
    ),
    "fast-pure": TrainConfig(
        model="cifar128", optimizer="muon", epochs=10, batch_size=256, lr=2e-3, warmup_epochs=1,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip-translate",
    ),
    # 60 minutes (a time budget: as many steps as fit; --time-budget 0 --epochs N for a fixed length) of
    # 192 wide, 6 deep (3 heads of 64, ~10% faster on a CPU than 6 of 32) behind the conv stem, with Muon.
    # Enough epochs that TrivialAugment (one random op per image, nothing to tune) and a little stochastic
    # depth pay for themselves; mixup/cutmix stay off, they need 100+ epochs. No EMA: the decay to zero
    # already averages the last epochs. Warmup 2 epochs for the wider model.
    "cpu-hour": TrainConfig(
        model="conv192", optimizer="muon", epochs=30, batch_size=256, lr=1.5e-3, warmup_epochs=2,
        weight_decay=0.05, grad_clip=1.0, drop_path=0.05, augment=dataclasses.replace(_LIGHT, policy="trivial"),
        tta="flip-translate", time_budget=60,
    ),
    "cpu-hour-pure": TrainConfig(
        model="cifar192", optimizer="muon", epochs=30, batch_size=256, lr=1.5e-3, warmup_epochs=2,
        weight_decay=0.05, grad_clip=1.0, drop_path=0.05, augment=dataclasses.replace(_LIGHT, policy="trivial"),
        tta="flip-translate", time_budget=60,
    ),
    # Swin (shifted windows, issue 22) in the 3- and 15-minute slots, for the side-by-side with sprint / fast in
    # benchmarks/RESULTS.md. swin-cifar is the variant table's CIFAR Swin (32 px, patch 2, window 4). The
    # optimisation is the conv-stem recipes' (Muon for the block matrices, lr 2e-3, warmup, light augmentation,
    # flip TTA), not tuned for Swin: the comparison changes the model only. No progressive resizing: a Swin's
    # window masks are laid out for one grid. Both are time budgets, since no Swin epoch count has been measured
    # yet (`--time-budget 0 --epochs N` runs a fixed length; the epochs below are the siblings', used only then).
    "swin-sprint": TrainConfig(
        model="swin-cifar", optimizer="muon", epochs=3, batch_size=256, lr=2e-3, warmup_epochs=0.5,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip", time_budget=3,
    ),
    "swin-fast": TrainConfig(
        model="swin-cifar", optimizer="muon", epochs=8, batch_size=256, lr=2e-3, warmup_epochs=1,
        weight_decay=0.05, grad_clip=1.0, augment=_LIGHT, tta="flip-translate", time_budget=15,
    ),
    # The CNN teacher for distillation (vitlab.distill.TeacherNet, airbench-style): trained like any run,
    # `vitlab train --recipe teacher`, or first inside a student's run with --teacher stage.
    "teacher": TrainConfig(
        model="cnn-32-64-128", epochs=10, batch_size=256, lr=1e-2, warmup_epochs=1, weight_decay=0.05,
        grad_clip=1.0, augment=dataclasses.replace(_LIGHT, crop_padding=2, label_smoothing=0.2),
    ),
    # Fine-tuning pretrained weights (`--recipe finetune --init SRC`; the architecture is SRC's): the usual
    # ViT fine-tuning defaults (BEiT / DeiT III) scaled to small datasets: a low peak lr with layer-wise decay
    # 0.75, so the lower blocks move least; a one-epoch warmup; light augmentation, no mixup/cutmix; drop path
    # 0.1. Small sets (a few hundred images) need more epochs than big ones: 30 (benchmarks/finetune.py).
    "finetune": TrainConfig(
        model="cifar128", epochs=30, batch_size=64, lr=5e-4, warmup_epochs=1, weight_decay=0.05, grad_clip=1.0,
        drop_path=0.1, layer_decay=0.75, augment=_LIGHT,
    ),
}
NEEDS_INIT = ("finetune",)  # recipes that start from pretrained weights (--init)
DEFAULT_RECIPE = "fast"
# `--time-budget N` without --recipe: the recipe made for that length (N minutes <= the bound); a Swin model
# (--model swin-*) the Swin recipe of that length.
BUDGET_RECIPES = ((5, "sprint"), (30, "fast"), (float("inf"), "cpu-hour"))
SWIN_BUDGET_RECIPES = ((5, "swin-sprint"), (float("inf"), "swin-fast"))
DEPRECATED_RECIPES = {"seed": "tutorial"}  # old names that still work, with a warning

# Flags that reshape the augmentation; the CLI passes them flat, they land in `augment`.
AUGMENT_FIELDS = {f.name for f in dataclasses.fields(AugmentConfig)} - {"mean", "std"}


def recipe_for_budget(minutes: float | None, model: str | None = None) -> str:
    """The recipe `vitlab train --time-budget MINUTES [--model MODEL]` runs when no --recipe is given."""
    if not minutes:
        return DEFAULT_RECIPE
    table = SWIN_BUDGET_RECIPES if (model or "").strip().startswith("swin-") else BUDGET_RECIPES
    return next(name for bound, name in table if minutes <= bound)


def resolve_recipe(name: str = DEFAULT_RECIPE, **overrides) -> TrainConfig:
    """The recipe `name` with single fields replaced (`with_overrides`)."""
    if name in DEPRECATED_RECIPES:
        warnings.warn(f"recipe {name!r} is now called {DEPRECATED_RECIPES[name]!r}", FutureWarning, stacklevel=2)
        name = DEPRECATED_RECIPES[name]
    if name not in RECIPES:
        raise VitlabError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return with_overrides(RECIPES[name], **overrides)


def with_overrides(cfg: RunConfig, **overrides) -> RunConfig:
    """`cfg` with single fields replaced (None: keep); augmentation fields may be given flat.

    `model=` without `model_args=` drops the recipe's model_args: they reshape the recipe's own model, and
    `--model Ti/4` means timm's Ti, not Ti squeezed into the recipe's width.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    aug = {k: overrides.pop(k) for k in list(overrides) if k in AUGMENT_FIELDS}
    if aug:
        overrides["augment"] = dataclasses.replace(overrides.get("augment", cfg.augment), **aug)
    known = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise VitlabError(f"unknown training options {bad}; known: {sorted(known | AUGMENT_FIELDS)}")
    if "model" in overrides and "model_args" not in overrides and overrides["model"] != cfg.model:
        overrides["model_args"] = {}
    return dataclasses.replace(cfg, **overrides)
