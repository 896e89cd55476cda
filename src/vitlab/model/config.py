"""`ViTConfig`, the one dataclass that describes a Vision Transformer, and the variant table.

Variants are decoded big_vision style from ONE table: "Ti/4" means the Ti width/depth/heads/MLP
row with 4x4 patches. Besides big_vision's rows it holds the CIFAR-sized models the recipes train:
"tutorial" is the model of Tin Nguyen's blog post "Implementing Vision Transformer (ViT) from Scratch"
(48 wide, 4 deep, 4 heads, MLP 192, 32x32 images, 4x4 patches), "cifar128" / "cifar192" are the pure
(patchify) models of the `*-pure` recipes, and "conv128" / "conv192" the same encoders behind a conv stem,
the models of `sprint`, `fast` and `cpu-hour`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field

from vitlab.errors import VitlabError, check_fields
from vitlab.model.hub import METADATA_KEYS

POS_EMBEDS = ("learned", "sincos2d", "none")
POOLINGS = ("cls", "gap", "map", "seq")
STEMS = ("patchify", "conv")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
# name -> (width, depth, heads, mlp_dim). The CIFAR-sized rows first, then big_vision's table.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tutorial": (48, 4, 4, 192),
    "cifar128": (128, 6, 4, 256),  # MLP ratio 2, as the 93.6% CIFAR ViT
    "cifar192": (192, 6, 3, 384),
    "conv128": (128, 6, 4, 256),  # cifar128 behind a conv stem
    "conv192": (192, 6, 3, 384),
    "test": (16, 1, 2, 32),  # for tests, as timm's test_vit: builds and steps in milliseconds
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "So400m": (1152, 27, 16, 4304),
}
# Defaults a variant brings besides its row: the CIFAR-sized models are 32x32 /4 with 10 classes.
_CIFAR = {"image_size": 32, "patch_size": 4, "num_classes": 10}
_CONV = {**_CIFAR, "stem": "conv"}
VARIANT_DEFAULTS: dict[str, dict] = {"tutorial": _CIFAR, "cifar128": _CIFAR, "cifar192": _CIFAR,
                                     "conv128": _CONV, "conv192": _CONV, "test": _CIFAR}
# Old names that still work, with a warning.
DEPRECATED_VARIANTS = {"seed": "tutorial"}  # "seed" read like the RNG argument: create_model("seed", seed=0)


@dataclass
class ViTConfig:
    """Everything that shapes a VisionTransformer. Field names follow timm where one exists."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    stem: str = "patchify"  # patchify (one strided conv) | conv (a small convolutional tokenizer, CCT style)
    stem_channels: tuple[int, ...] | None = None  # conv stem widths, one per halving; None: width/2^k ... width/2
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    pos_embed: str = "learned"  # learned | sincos2d | none
    pos_embed_prefix: bool = True  # learned positions also cover class/register tokens (timm default)
    class_token: bool = True
    reg_tokens: int = 0
    distill_token: bool = False  # DeiT: a second prefix token with its own head, trained to match a teacher
    pooling: str = "cls"  # cls | gap | map | seq (CCT's attention-weighted mean of the patch tokens)
    dropout: float = 0.0  # after embeddings, attention projection and MLP (ViT paper)
    attn_dropout: float = 0.0
    head_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block, linear from 0
    layerscale_init: float | None = None  # LayerScale (CaiT) gamma init; None: off
    norm_eps: float = 1e-6
    activation: str = "gelu"  # gelu | gelu_tanh | quick_gelu
    pre_norm: bool = False  # LayerNorm before the encoder (CLIP)
    final_norm: bool = True
    fc_norm: bool | None = None  # norm after pooling instead of before; None: on for gap (timm)
    patch_bias: bool | None = None  # None: bias unless pre_norm (timm, CLIP)
    pre_logits_dim: int = 0  # >0: Linear+tanh between pooling and head (HF ViTModel pooler)
    name: str = field(default="", compare=False)  # variant string it was made from, informative only

    def __post_init__(self) -> None:
        if self.stem_channels is not None:  # JSON gives a list
            self.stem_channels = tuple(int(c) for c in self.stem_channels)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.reg_tokens

    @property
    def stem_stages(self) -> int:
        """Halvings of the resolution in the conv stem: log2(patch_size)."""
        return self.patch_size.bit_length() - 1

    @property
    def conv_stem_channels(self) -> tuple[int, ...]:
        if self.stem_channels is not None:
            return self.stem_channels
        k = self.stem_stages
        return tuple(max(8, self.width // 2 ** (k - i)) for i in range(k))

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def use_fc_norm(self) -> bool:
        return self.pooling == "gap" if self.fc_norm is None else self.fc_norm

    @property
    def use_patch_bias(self) -> bool:
        return not self.pre_norm if self.patch_bias is None else self.patch_bias

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise VitlabError(f"invalid ViTConfig: {msg}")

        for k in ("image_size", "patch_size", "in_channels", "width", "depth", "heads", "mlp_dim"):
            need(int(getattr(self, k)) > 0, f"{k} must be a positive integer, got {getattr(self, k)!r}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.reg_tokens >= 0, f"reg_tokens must be >= 0, got {self.reg_tokens}")
        need(self.width % self.heads == 0,
             f"width {self.width} is not divisible by heads {self.heads}; change width or heads")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
             f"use an image size that is a multiple of {self.patch_size}")
        need(self.pos_embed in POS_EMBEDS, f"pos_embed {self.pos_embed!r} unknown; choose one of {POS_EMBEDS}")
        need(self.pooling in POOLINGS, f"pooling {self.pooling!r} unknown; choose one of {POOLINGS}")
        need(self.activation in ACTIVATIONS,
             f"activation {self.activation!r} unknown; choose one of {ACTIVATIONS}")
        need(self.pooling != "cls" or self.class_token, "pooling 'cls' needs class_token=True")
        for k in ("dropout", "attn_dropout", "head_dropout", "drop_path"):
            need(0.0 <= getattr(self, k) < 1.0, f"{k} must be in [0, 1), got {getattr(self, k)}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.pos_embed != "sincos2d" or self.width % 4 == 0,
             f"pos_embed 'sincos2d' needs a width divisible by 4, got {self.width}")
        need(self.stem in STEMS, f"stem {self.stem!r} unknown; choose one of {STEMS}")
        if self.stem == "conv":
            need(self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0,
                 f"the conv stem halves the resolution log2(patch_size) times: patch_size must be a power of 2 "
                 f">= 2, got {self.patch_size}")
            need(self.stem_channels is None or (len(self.stem_channels) == self.stem_stages
                                                and all(c > 0 for c in self.stem_channels)),
                 f"stem_channels needs {self.stem_stages} positive widths (one per halving), "
                 f"got {self.stem_channels}")

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        check_fields(cls, d, "ViTConfig", ignore=METADATA_KEYS)
        return cls(**{k: v for k, v in d.items() if k not in METADATA_KEYS})

    def summary(self, params: int | None = None) -> str:
        """"tutorial 48w 4d 4h /4 32px (0.12M params)": what a run, `info`, `explain` and `convert` print."""
        size = f" ({params / 1e6:.2f}M params)" if params is not None else ""
        kind = " (conv stem)" if self.stem == "conv" else ""
        return (f"{self.name or 'ViT'}{kind} {self.width}w {self.depth}d {self.heads}h /{self.patch_size} "
                f"{self.image_size}px{size}")


_VARIANT_RE = re.compile(r"^(?P<name>[A-Za-z0-9]+?)(?:/(?P<patch>\d+))?$")


def list_variants() -> list[str]:
    return list(VARIANTS)


def parse_variant(variant: str, **overrides) -> ViTConfig:
    """Decode "Ti/4", "B/16", "tutorial" (+ keyword overrides) into a ViTConfig."""
    m = _VARIANT_RE.match(variant.strip())
    if m and m["name"] in DEPRECATED_VARIANTS:
        new = DEPRECATED_VARIANTS[m["name"]]
        warnings.warn(f"model variant {m['name']!r} is now called {new!r}", FutureWarning, stacklevel=2)
        variant = new + (f"/{m['patch']}" if m["patch"] else "")
        m = _VARIANT_RE.match(variant)
    if not m or m["name"] not in VARIANTS:
        raise VitlabError(
            f"unknown model variant {variant!r}; use NAME or NAME/PATCH with NAME in {list(VARIANTS)}, e.g. 'Ti/4'"
        )
    width, depth, heads, mlp_dim = VARIANTS[m["name"]]
    kw: dict = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim)
    kw.update(VARIANT_DEFAULTS.get(m["name"], {}))
    if m["patch"]:
        kw["patch_size"] = int(m["patch"])
    text = {f.name for f in dataclasses.fields(ViTConfig) if isinstance(f.default, str)}
    # `--model-arg pos_embed=none` arrives as None: for a text field it is the word (pos_embed's "none")
    overrides = {k: "none" if v is None and k in text else v for k, v in overrides.items()}
    check_fields(ViTConfig, overrides, "ViTConfig")
    kw.update(overrides)
    kw.setdefault("name", variant)
    return ViTConfig(**kw)
