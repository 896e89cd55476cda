"""Configs of an image-text model: the text tower (`TextConfig`) and the pair (`CLIPConfig`).

The vision tower is described by the ordinary `ViTConfig` (with `num_classes=0`): CLIP and SigLIP image
encoders are Vision Transformers with a few flags set, not separate classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from vitlab.errors import VitlabError, check_fields
from vitlab.model.config import ACTIVATIONS, ViTConfig

KINDS = ("clip", "siglip")
TEXT_POOLINGS = ("eos", "argmax", "last")
# Temperature / bias initialisations from the papers (HF initialises SigLIP's to 0, so they are explicit here).
LOGIT_SCALE_INIT = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
LOGIT_BIAS_INIT = {"clip": None, "siglip": -10.0}


def _need(ok: bool, what: str, msg: str) -> None:
    if not ok:
        raise VitlabError(f"invalid {what}: {msg}")


@dataclass
class TextConfig:
    """A text Transformer: token + learned position embeddings, pre-norm blocks, final LayerNorm, pooling.

    causal: CLIP masks attention to earlier tokens; SigLIP's text tower attends both ways.
    pooling: "eos" = first position of `eos_token_id` (CLIP), "argmax" = position of the largest id (CLIP
    configs with the legacy eos_token_id 2, as transformers does), "last" = last position (SigLIP).
    """

    vocab_size: int = 259
    context_length: int = 32
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    activation: str = "gelu"
    causal: bool = True
    pooling: str = "eos"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for k in ("vocab_size", "context_length", "width", "depth", "heads", "mlp_dim"):
            _need(int(getattr(self, k)) > 0, "TextConfig", f"{k} must be a positive integer, got {getattr(self, k)!r}")
        _need(self.width % self.heads == 0, "TextConfig", f"width {self.width} is not divisible by heads {self.heads}")
        _need(self.activation in ACTIVATIONS, "TextConfig",
              f"activation {self.activation!r} unknown; choose one of {ACTIVATIONS}")
        _need(self.pooling in TEXT_POOLINGS, "TextConfig",
              f"pooling {self.pooling!r} unknown; choose one of {TEXT_POOLINGS}")
        _need(self.pooling != "eos" or self.eos_token_id is not None, "TextConfig",
              "pooling 'eos' needs eos_token_id")
        _need(self.norm_eps > 0, "TextConfig", f"norm_eps must be > 0, got {self.norm_eps}")


@dataclass
class CLIPConfig:
    """Two towers, a shared embedding size and the learnable temperature (and SigLIP's bias).

    kind "clip": bias-free `visual_projection` and `text_projection` to `embed_dim`, softmax loss.
    kind "siglip": the vision tower's pooled output is the embedding (so `embed_dim` = vision width), the text
    tower ends in a Linear with bias (HF `text_model.head`), sigmoid loss with a learnable bias.
    """

    vision: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0))
    text: TextConfig = field(default_factory=lambda: TextConfig(eos_token_id=257))
    kind: str = "clip"
    embed_dim: int = 512
    logit_scale_init: float | None = None  # None: ln(1/0.07) for CLIP, ln(10) for SigLIP
    logit_bias_init: float | None = None  # None: -10 for SigLIP; CLIP has no bias

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.logit_scale_init is None and self.kind in KINDS:
            self.logit_scale_init = LOGIT_SCALE_INIT[self.kind]
        if self.logit_bias_init is None and self.kind in KINDS:
            self.logit_bias_init = LOGIT_BIAS_INIT[self.kind]
        self.validate()

    @property
    def has_logit_bias(self) -> bool:
        return self.kind == "siglip"

    def validate(self) -> None:
        _need(self.kind in KINDS, "CLIPConfig", f"kind {self.kind!r} unknown; choose one of {KINDS}")
        _need(self.embed_dim > 0, "CLIPConfig", f"embed_dim must be positive, got {self.embed_dim}")
        _need(self.vision.num_classes == 0, "CLIPConfig",
              f"the vision tower must have num_classes=0 (it returns pooled features), got {self.vision.num_classes}")
        if self.kind == "siglip":
            _need(self.embed_dim == self.vision.width, "CLIPConfig",
                  f"SigLIP has no visual projection: embed_dim {self.embed_dim} must equal the vision width "
                  f"{self.vision.width}")
        else:
            _need(self.logit_bias_init is None, "CLIPConfig", "CLIP has no logit bias; leave logit_bias_init None")
        self.vision.validate()
        self.text.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        check_fields(cls, d, "CLIPConfig")
        if isinstance(d.get("text"), dict):
            check_fields(TextConfig, d["text"], "TextConfig")
        return cls(**d)
