"""What the classifier sees: the pooled embedding of each image, and 2-D maps of those embeddings.

`embed_images` returns the vector the head classifies: the class token (cls), the patch mean (gap)
or the MAP output (map), after the final norm, i.e. `forward_head(feats, pre_logits=True)`.
"""

from __future__ import annotations

import importlib.util

import torch

from vitlab.inspect.pca import pca_2d
from vitlab.model.vit import VisionTransformer

__all__ = ["embed_images", "has_tsne", "pca_2d", "tsne_2d"]


@torch.no_grad()
def embed_images(model: VisionTransformer, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, F) pre-logit embeddings, computed in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = [model.forward_head(model.forward_features(x.to(model.device)), pre_logits=True).float().cpu()
               for x in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)  # (B, F)


def has_tsne() -> bool:
    """t-SNE comes from scikit-learn, an optional dependency."""
    return importlib.util.find_spec("sklearn") is not None


def tsne_2d(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """(n, F) -> (n, 2) t-SNE coordinates (needs scikit-learn; check `has_tsne()` first)."""
    from sklearn.manifold import TSNE

    x = torch.as_tensor(x).float().cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))  # must stay below the sample count
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return torch.from_numpy(xy).float()
