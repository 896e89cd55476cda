"""The Vision Transformer and the Swin Transformer: configs and variants, layers, the models, their cost model."""

from vitlab.model.config import VARIANTS, ViTConfig, list_variants, parse_variant
from vitlab.model.flops import activation_bytes_per_image, estimate_mfu, flops_per_image
from vitlab.model.registry import create_model, load_pretrained, model_class, model_config
from vitlab.model.swin import SWIN_VARIANTS, SwinConfig, SwinTransformer, parse_swin_variant
from vitlab.model.vit import VisionTransformer

__all__ = ["SWIN_VARIANTS", "VARIANTS", "SwinConfig", "SwinTransformer", "ViTConfig", "VisionTransformer",
           "activation_bytes_per_image", "create_model", "estimate_mfu", "flops_per_image", "list_variants",
           "load_pretrained", "model_class", "model_config", "parse_swin_variant", "parse_variant"]
