"""CLIP and SigLIP: a `VisionTransformer` and a `TextTransformer` meeting in one embedding space.

image (B, 3, H, W) -> ViT (num_classes=0) -> pooled (B, Dv) -> [visual_projection] -> (B, E)
ids (B, L) -> text tower -> pooled (B, Dt) -> text_projection -> (B, E)
logits = exp(logit_scale) * cos(image, text) [+ logit_bias for SigLIP]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.clip.config import CLIPConfig
from vitlab.clip.losses import clip_loss, clip_scale, siglip_loss
from vitlab.clip.text import TextTransformer
from vitlab.errors import VitlabError
from vitlab.model.hub import PretrainedMixin, seeded
from vitlab.model.vit import VisionTransformer

MODEL_TYPE = "vitlab_clip"


class CLIPModel(PretrainedMixin, nn.Module):
    """Two towers + learnable temperature (and bias for kind "siglip"). `SigLIPModel` is the same class."""

    model_type = MODEL_TYPE
    config_class = CLIPConfig
    extra_keys = ("tokenizer", "preprocess")

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        if cfg.kind == "clip":
            self.visual_projection = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
            self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        else:  # SigLIP: the MAP head output is the image embedding; the text tower ends in a biased Linear
            self.visual_projection = nn.Identity()
            self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init))) if cfg.has_logit_bias else None
        for proj in (self.visual_projection, self.text_projection):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)  # open_clip: width^-0.5
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    @property
    def kind(self) -> str:
        return self.cfg.kind

    # ---- encoders -----------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> image embeddings (B, E), unit length unless normalize=False."""
        x = self.visual_projection(self.vision(pixel_values))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids -> text embeddings (B, E), unit length unless normalize=False.

        attention_mask (B, L) of 1/0 hides padding from attention, as transformers does; the pooled position
        does not depend on it (first EOS for CLIP, last position for SigLIP).
        """
        x = self.text_projection(self.text(input_ids, attention_mask=attention_mask))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    # ---- similarity and loss ------------------------------------------------------------------------
    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(Bi, E) x (Bt, E) normalised embeddings -> (Bi, Bt) logits: scaled cosine (+ bias)."""
        cos = image_embeds @ text_embeds.T
        if self.logit_bias is None:
            return clip_scale(self.logit_scale) * cos
        return self.logit_scale.exp() * cos + self.logit_bias

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """CLIP: softmax over the texts; SigLIP: an independent sigmoid per pair (what each was trained for)."""
        return logits.softmax(dim=-1) if self.logit_bias is None else logits.sigmoid()

    def loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The training loss of this kind on a batch of matching (image, text) embeddings."""
        if self.logit_bias is None:
            return clip_loss(image_embeds, text_embeds, self.logit_scale)
        return siglip_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (Bi, Bt), logits_per_text (Bt, Bi)), as transformers' CLIPModel."""
        logits = self.logits(self.encode_image(pixel_values),
                             self.encode_text(input_ids, attention_mask=attention_mask))
        return logits, logits.T

    # ---- training helpers ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Positions and tokens (as the ViT's), and the temperature and bias, which must never shrink."""
        skip = {f"vision.{n}" for n in self.vision.no_weight_decay()}
        return skip | {"text.pos_embed", "logit_scale", "logit_bias"}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def summary(self) -> str:
        """One line naming the model, as the ViT's and Swin's `summary` (PretrainedMixin's needs a cfg.summary)."""
        return (f"{self.kind.upper()}: image and text towers, {self.cfg.embed_dim}-d embeddings "
                f"({self.num_params() / 1e6:.2f}M params)")

    # ---- save / load (config.json + model.safetensors; from_pretrained comes from PretrainedMixin) -----
    def save_pretrained(self, directory: str | Path, *, tokenizer=None, preprocess=None) -> Path:
        """Also store the tokenizer and preprocessing settings in config.json.

        tokenizer: a `ByteTokenizer` (stored in config.json) or an `HFTokenizer` (its files are written too).
        preprocess: an `ImagePreprocess`, so `vitlab zeroshot` prepares images as the model expects.
        """
        extra = {}
        if tokenizer is not None:
            tokenizer.save(Path(directory))
            extra["tokenizer"] = tokenizer.to_dict()
        if preprocess is not None:
            extra["preprocess"] = preprocess.to_dict()
        return super().save_pretrained(directory, **extra)

    @classmethod
    def build(cls, cfg: CLIPConfig) -> CLIPModel:
        return SigLIPModel(cfg) if cfg.kind == "siglip" else CLIPModel(cfg)


class SigLIPModel(CLIPModel):
    """CLIPModel with kind "siglip": sigmoid loss, learnable logit bias, no visual projection."""

    def __init__(self, cfg: CLIPConfig) -> None:
        if cfg.kind != "siglip":
            raise VitlabError(f"SigLIPModel needs a config of kind 'siglip', got {cfg.kind!r}")
        super().__init__(cfg)


def create_clip(cfg: CLIPConfig, *, seed: int | None = None) -> CLIPModel:
    """The model class for `cfg.kind`; `seed` makes the init reproducible."""
    with seeded(seed):
        return CLIPModel.build(cfg)
