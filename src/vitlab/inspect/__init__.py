"""Look inside a ViT: attention maps and rollout, attention distance, position-embedding similarity,
patch-filter PCA and embedding maps, as tensors (here) and as figures (`vitlab.inspect.plots`, which
needs matplotlib). `vitlab explain RUN_DIR` draws them all into one HTML report.
"""

from vitlab.inspect.attention import (
    attention_maps,
    attention_rollout,
    cls_attention,
    pooling_attention,
    rollout_map,
    to_grid,
)
from vitlab.inspect.distance import mean_attention_distance, patch_distances
from vitlab.inspect.embeddings import embed_images, has_tsne, tsne_2d
from vitlab.inspect.filters import patch_filter_components, patch_filter_pca
from vitlab.inspect.images import model_inputs, prepare_images
from vitlab.inspect.pca import pca, pca_2d
from vitlab.inspect.posemb import patch_position_embedding, position_similarity
from vitlab.inspect.rundir import Run, confusion_matrix, load_run
from vitlab.modeldir import run_preprocess

__all__ = [
    "Run", "attention_maps", "attention_rollout", "cls_attention", "confusion_matrix", "embed_images",
    "has_tsne", "load_run", "mean_attention_distance", "model_inputs", "patch_distances",
    "patch_filter_components", "patch_filter_pca", "patch_position_embedding", "pca", "pca_2d",
    "pooling_attention", "position_similarity", "prepare_images", "rollout_map", "run_preprocess", "to_grid",
    "tsne_2d",
]
