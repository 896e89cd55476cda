"""`preprocessor_config.json` for transformers from a vitlab `ImagePreprocess` (the inverse of `from_hf`)."""

from __future__ import annotations

import dataclasses

from vitlab.errors import VitlabError
from vitlab.preprocess import RESAMPLE, ImagePreprocess


def hf_image_processor_config(pre: ImagePreprocess, kind: str = "vit") -> dict:
    """A transformers image processor config giving the same pixels as `pre` (up to its resampling backend).

    ViT / SigLIP processors resize to a square without cropping; anything else (shortest edge + centre
    crop, as CLIP) is written as a CLIPImageProcessor, which every transformers model can be paired with.
    """
    if pre.resize != "square" and pre.crop_size is None:
        raise VitlabError("preprocessing that resizes the shortest edge without cropping gives no fixed input "
                          "size; transformers' processors cannot describe it")
    square = pre.resize == "square" and pre.crop_size is None
    kind_name = {"vit": "ViTImageProcessor", "siglip": "SiglipImageProcessor"}.get(kind, "CLIPImageProcessor")
    name = kind_name if square else "CLIPImageProcessor"
    d = {
        "image_processor_type": name,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": pre.size, "width": pre.size} if pre.resize == "square" else {"shortest_edge": pre.size},
        "resample": int(RESAMPLE[pre.resample]),
        "do_center_crop": pre.crop_size is not None,
        "do_rescale": True,
        "rescale_factor": pre.rescale_factor,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
    }
    if pre.crop_size is not None:
        d["crop_size"] = {"height": pre.crop_size, "width": pre.crop_size}
    back = dataclasses.replace(ImagePreprocess.from_hf(d), backend=pre.backend)
    if back != pre:  # the writer and from_hf disagree: a bug here, not bad input
        raise RuntimeError(f"image processor config {d} reads back as {back}, not {pre}")
    return d
