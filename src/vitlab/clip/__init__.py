"""CLIP and SigLIP: image-text models built from the ViT's blocks, their losses, tokenizer and zero-shot use."""

from vitlab.clip.config import CLIPConfig, TextConfig
from vitlab.clip.losses import clip_loss, siglip_loss, siglip_loss_chunked
from vitlab.clip.model import CLIPModel, SigLIPModel, create_clip
from vitlab.clip.text import TextTransformer

__all__ = ["CLIPConfig", "CLIPModel", "SigLIPModel", "TextConfig", "TextTransformer", "clip_loss", "create_clip",
           "siglip_loss", "siglip_loss_chunked"]
