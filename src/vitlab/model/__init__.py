"""The Vision Transformer model: config and variants, layers, the model, its cost model."""

from vitlab.model.config import VARIANTS, ViTConfig, list_variants, parse_variant
from vitlab.model.flops import activation_bytes_per_image, estimate_mfu, flops_per_image
from vitlab.model.registry import create_model, load_pretrained, model_class, model_config
from vitlab.model.vit import VisionTransformer

__all__ = ["VARIANTS", "ViTConfig", "VisionTransformer", "activation_bytes_per_image", "create_model",
           "estimate_mfu", "flops_per_image", "list_variants", "load_pretrained", "model_class", "model_config",
           "parse_variant"]
