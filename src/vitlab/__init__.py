"""vitlab: Vision Transformers from scratch — build, train fast on a CPU, look inside, CLIP/SigLIP."""

from vitlab.model import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig, create_model, list_variants
from vitlab.version import __version__

__all__ = ["SwinConfig", "SwinTransformer", "ViTConfig", "VisionTransformer", "create_model", "list_variants",
           "__version__"]
