"""`--to hf`: a Hugging Face transformers directory (config.json, model.safetensors, preprocessor_config.json).

ViT classifiers become `ViTForImageClassification` (what `pipeline("image-classification")` loads), Swin
classifiers `SwinForImageClassification` (`SwinModel` without a classifier), CLIP and SigLIP dirs `CLIPModel` /
`SiglipModel`. The name mappings live beside their importers in `vitlab.convert`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vitlab.export.processor import hf_image_processor_config
from vitlab.modeldir import ModelDir
from vitlab.rundir import PREPROCESSOR_NAME
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, atomic_write, save_state_dict, write_json

# Files of a transformers tokenizer: copied along when the source directory has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "spiece.model", "added_tokens.json")


def export_hf(src: ModelDir, out: Path) -> list[str]:
    """Write the transformers directory; returns notes for the user."""
    from vitlab import __version__
    from vitlab.model.swin import SwinTransformer

    notes = []
    swin = isinstance(src.model, SwinTransformer)
    if swin:
        from vitlab.convert.hf_swin import to_hf_swin

        state, config = to_hf_swin(src.model, class_names=src.class_names)
    elif src.kind == "vit":
        from vitlab.convert.hf_vit import to_hf_vit

        state, config = to_hf_vit(src.model, class_names=src.class_names)
    else:
        from vitlab.convert.hf_clip import to_hf_clip

        state, config = to_hf_clip(src.model)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / PREPROCESSOR_NAME, hf_image_processor_config(src.preprocess, "vit" if swin else src.kind))
    if src.kind != "vit" and not swin:
        copied = [n for n in TOKENIZER_FILES if (src.path / n).is_file()]
        for name in copied:
            atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(src.path / name, tmp))
        if not copied:
            notes.append("vitlab's byte tokenizer has no transformers equivalent, so none was written: "
                         "give the model input_ids from vitlab.clip.tokenizer.ByteTokenizer")
    write_json(out / CONFIG_NAME, {**config, "dtype": "float32", "vitlab_version": __version__})  # last: complete
    return notes


@torch.no_grad()
def check_hf(src: ModelDir, out: Path) -> float | None:
    """Max |difference| of the transformers model's outputs from ours on a random batch; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    from vitlab.model.swin import SwinTransformer

    swin = isinstance(src.model, SwinTransformer)
    image = src.kind == "vit" or swin  # one image model with one output
    if not image or (swin and not src.model.cfg.num_classes):  # CLIP / SigLIP, or a SwinModel
        hf = transformers.AutoModel.from_pretrained(out)
    elif not swin and src.model.cfg.pre_logits_dim:
        hf = transformers.ViTModel.from_pretrained(out)
    else:
        hf = transformers.AutoModelForImageClassification.from_pretrained(out)
    hf.eval()
    vision = src.model.cfg if image else src.model.cfg.vision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, vision.in_channels, vision.image_size, vision.image_size, generator=g)
    if image:
        res = hf(pixel_values=x)
        theirs = res.logits if hasattr(res, "logits") else res.pooler_output
        return float((theirs - src.model(x)).abs().max())
    ids = src.tokenizer(["a photo of a cat.", "a dog"])
    res = hf(pixel_values=x, input_ids=ids)
    ours = src.model.logits(src.model.encode_image(x), src.model.encode_text(ids))
    return float((res.logits_per_image - ours).abs().max())
