"""Weight interop with timm and Hugging Face transformers (output parity, strict key checks).

`from_timm` / `to_timm` live in `timm.py`; `from_hf` dispatches on the transformers class:
ViT models go to `hf_vit.py`, CLIP and SigLIP to `hf_clip.py`, Swin to `hf_swin.py`.
"""

from __future__ import annotations

from vitlab.convert.timm import from_timm, timm_kwargs, to_timm


def from_hf(hf_model):
    """A vitlab model with the same outputs as a transformers ViT / CLIP / SigLIP / Swin model."""
    name = type(hf_model).__name__
    if name.startswith("Swin"):
        from vitlab.convert.hf_swin import from_hf_swin

        return from_hf_swin(hf_model)
    if name.startswith(("CLIP", "Siglip")):
        from vitlab.convert.hf_clip import from_hf_clip

        return from_hf_clip(hf_model)
    from vitlab.convert.hf_vit import from_hf_vit

    return from_hf_vit(hf_model)


__all__ = ["from_hf", "from_timm", "timm_kwargs", "to_timm"]
