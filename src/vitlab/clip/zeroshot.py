"""Zero-shot classification: class names -> prompts -> text embeddings -> nearest class for each image.

Template ensembling (Radford et al. 2021, sec. 3.1.4): every class is embedded with every template, the unit
vectors are averaged and the mean is renormalised, giving one unit vector per class. A model directory
(vitlab's or Hugging Face's CLIP / SigLIP) is opened by `vitlab.modeldir.open_model_dir`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vitlab.clip.model import CLIPModel
from vitlab.errors import VitlabError

# A few of CLIP's CIFAR-10 prompts; "{}" is replaced by the class name.
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
)


def fill_template(template: str, classname: str) -> str:
    """Put the class name into "{}" (or "{class}")."""
    if "{}" not in template and "{class}" not in template:
        raise VitlabError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template.replace("{class}", classname).replace("{}", classname)


@torch.no_grad()
def zero_shot_classifier(model: CLIPModel, tokenizer: Callable[[list[str]], torch.Tensor],
                         classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)
                         ) -> torch.Tensor:
    """One unit vector per class, (C, E): the renormalised mean of its templates' text embeddings."""
    if not classnames:
        raise VitlabError("no class names given")
    if not templates:
        raise VitlabError("no templates given")
    rows = []
    for name in classnames:
        ids = tokenizer([fill_template(t, name) for t in templates]).to(model.device)  # (T, L)
        emb = model.encode_text(ids).mean(dim=0)  # (E,) mean of unit vectors
        rows.append(emb / emb.norm())
    return torch.stack(rows)  # (C, E)


@torch.no_grad()
def zero_shot_predict(model: CLIPModel, classifier: torch.Tensor, pixel_values: torch.Tensor, *,
                      batch_size: int = 256) -> torch.Tensor:
    """(B, 3, H, W) -> class probabilities (B, C): softmax for CLIP, independent sigmoids for SigLIP."""
    out = []
    for i in range(0, pixel_values.shape[0], batch_size):
        images = model.encode_image(pixel_values[i:i + batch_size].to(model.device))  # (b, E)
        out.append(model.probs(model.logits(images, classifier)))  # (b, C)
    return torch.cat(out)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, classifier: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                       *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       batch_size: int = 500) -> float:
    """Top-1 accuracy over a labelled set; `transform` maps a raw batch (e.g. uint8) to model input."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        x = transform(x) if transform is not None else x
        pred = model.logits(model.encode_image(x.to(model.device)), classifier).argmax(dim=-1)  # (b,)
        correct += int((pred.cpu() == labels[i:i + batch_size]).sum())
    return correct / max(images.shape[0], 1)
