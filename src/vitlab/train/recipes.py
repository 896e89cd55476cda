"""`RunConfig` (what every run of the shared loop reads), `TrainConfig` (+ the ViT), and the ONE table of
named recipes.

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
from vitlab.errors import VitlabError, check_fields
from vitlab.speed import PRECISIONS
from vitlab.train.guard import ON_NONFINITE

RUN_CONFIG = "train_config.json"  # the resolved config + plan + data info, in every run dir


@dataclass(frozen=True)
class RunConfig:
    """What every run of the shared loop (`vitlab.train.loop.Trainer`) reads: data selection, optimisation,
    execution. `TrainConfig` (ViT classification) and `ClipTrainConfig` add their model's fields.
    Field names are the CLI flags with dashes turned into underscores, the same in `train` and `train-clip`."""

    # ---- data ------------------------------------------------------------------------------------------
    dataset: str = "cifar10"  # cifar10 | cifar100 | folder
    val_split: float = 0.0  # fraction of train held out (seeded) and evaluated each epoch
    train_subset: int = 0  # >0: train on the first N (after the val split) images only; for quick checks
    test_subset: int = 0  # >0: evaluate on the first N test images only
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # mean/std are set from the dataset
    # ---- optimisation ----------------------------------------------------------------------------------
    epochs: float = 10  # may be fractional: training length is epochs * steps_per_epoch optimizer steps
    max_steps: int = 0  # >0: stop after this many optimizer steps (the schedule ends there too)
    batch_size: int = 256
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 0.0  # learning rate at the end of the cosine
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05  # decoupled (AdamW); never on norms, biases, tokens, positions
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    on_nonfinite: str = "stop"  # NaN/Inf loss or gradient norm: stop (keep the last good checkpoint) | skip the step
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.999); 0 = off. The EMA is evaluated and saved.
    # ---- execution -------------------------------------------------------------------------------------
    precision: str = "auto"  # fp32 | bf16 (autocast) | bf16-pure | auto (vitlab.speed.resolve_precision)
    compile: bool = False  # torch.compile the model
    eval_batch_size: int = 1000
    time_budget: float = 0.0  # minutes; >0: fit steps + schedule to end within this wall-clock budget
    log_every: int = 10  # optimizer steps between points of the per-step loss log (steps.jsonl)
    seed: int = 0
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tb (vitlab.train.tensorboard)

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
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        need(self.on_nonfinite in ON_NONFINITE,
             f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, not {self.on_nonfinite!r}")

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
    """A ViT classification run (`vitlab train`): the shared fields plus the model."""

    # ---- model: a variant from vitlab.model's table, optionally reshaped by model_args -----------------
    model: str = "tutorial"
    model_args: dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"width": 96, "depth": 6}
    drop_path: float = 0.0  # stochastic depth of the last block (linear from 0)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.drop_path < 1:
            raise VitlabError(f"invalid training config: drop_path must be in [0, 1), got {self.drop_path}")


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
    # DEFAULT, ~15 minutes here: 12 epochs of a 128-wide, 6-deep /4 model (0.81M parameters, MLP ratio 2 as
    # the 93.6% CIFAR ViT; 4 heads of 32). Wider than that sees too few epochs in 15 minutes, narrower
    # underfits. AdamW at 2e-3 (batch 256): a small model warmed up for an epoch takes it, and a short run
    # needs the large steps; wd 0.05 and label smoothing 0.1 as DeiT; random crop (pad 4) + flip only.
    "fast": TrainConfig(
        model="cifar128",
        epochs=12, batch_size=256, lr=2e-3, warmup_epochs=1, weight_decay=0.05, grad_clip=1.0,
        augment=_LIGHT,
    ),
    # 60 minutes (a time budget: as many steps as fit, ~30+ epochs here; --time-budget 0 --epochs N for a
    # fixed length) of 192 wide, 6 deep (1.8M parameters; 3 heads of 64, ~10% faster on a CPU than 6 of
    # 32). Enough epochs that TrivialAugment (one random op per image, nothing to tune) and a
    # little stochastic depth pay for themselves; mixup/cutmix stay off, they need 100+ epochs. No EMA:
    # the cosine to zero already averages the last epochs. Warmup 2 epochs for the wider model.
    "cpu-hour": TrainConfig(
        model="cifar192",
        epochs=30, batch_size=256, lr=1.5e-3, warmup_epochs=2, weight_decay=0.05, grad_clip=1.0,
        drop_path=0.05, augment=dataclasses.replace(_LIGHT, policy="trivial"), time_budget=60,
    ),
}
DEFAULT_RECIPE = "fast"
DEPRECATED_RECIPES = {"seed": "tutorial"}  # old names that still work, with a warning

# Flags that reshape the augmentation; the CLI passes them flat, they land in `augment`.
AUGMENT_FIELDS = {f.name for f in dataclasses.fields(AugmentConfig)} - {"mean", "std"}


def resolve_recipe(name: str = DEFAULT_RECIPE, **overrides) -> TrainConfig:
    """The recipe `name` with single fields replaced; augmentation fields may be given flat.

    `model=` without `model_args=` drops the recipe's model_args: they reshape the recipe's own model, and
    `--model Ti/4` means timm's Ti, not Ti squeezed into the recipe's width.
    """
    if name in DEPRECATED_RECIPES:
        warnings.warn(f"recipe {name!r} is now called {DEPRECATED_RECIPES[name]!r}", FutureWarning, stacklevel=2)
        name = DEPRECATED_RECIPES[name]
    if name not in RECIPES:
        raise VitlabError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    cfg = RECIPES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    aug = {k: overrides.pop(k) for k in list(overrides) if k in AUGMENT_FIELDS}
    if aug:
        overrides["augment"] = dataclasses.replace(overrides.get("augment", cfg.augment), **aug)
    if "model" in overrides and "model_args" not in overrides and overrides["model"] != cfg.model:
        overrides["model_args"] = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise VitlabError(f"unknown training options {bad}; known: {sorted(known | AUGMENT_FIELDS)}")
    return dataclasses.replace(cfg, **overrides)
