"""Open any model vitlab can use, whatever wrote it, as one `ModelDir`: the model in eval mode on the CPU, how an
image becomes its input, its class names, and for a run dir the run's record.

    md = open_model_dir("runs/fast")          # predict, eval, explain, export, demo, zeroshot and --init all start here
    md.kind, md.model, md.preprocess(["cat.png"]), md.labels

What it opens (dispatched on config.json's `model_type`):
- a vitlab model dir or run dir of any family in `vitlab.model.registry` (kind "vit"; a Swin dir "swin": the
  model_type without "vitlab_"), the CNN teacher of distillation (kind "teacher"), a vitlab CLIP / SigLIP dir
  (kind "clip" / "siglip", with its tokenizer);
- a Hugging Face dir: ViT, CLIP / SigLIP (a vision-only one is a "vit" feature extractor), and any other family
  `vitlab.convert.from_hf` converts (built with transformers first);
- a timm .safetensors file or dir, described by timm's hub config.json beside it or by a vitlab `variant`.
`origin` says which of these it was ("vitlab", "vitlab_clip", "hf_vit", "hf_clip", "hf_<model_type>", "timm").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vitlab.errors import VitlabError
from vitlab.preprocess import HALF, RESAMPLE, ImagePreprocess, clip_preprocess, siglip_preprocess
from vitlab.rundir import PREPROCESSOR_NAME, RUN_CONFIG, read_preprocessor_config
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, read_json

KIND_WORDS = {"vit": "ViT", "swin": "Swin Transformer", "teacher": "CNN teacher", "clip": "CLIP model",
              "siglip": "SigLIP model"}
CLIP_KINDS = ("clip", "siglip")  # two towers and a tokenizer: they classify zero-shot, without a head
NOT_FOUND = "not a model directory (config.json + model.safetensors) nor a .safetensors file"


@dataclass
class ModelDir:
    path: Path  # the directory (of a timm .safetensors file: the one holding it)
    kind: str  # "vit" | "swin" (any registry family, by model_type) | "teacher" | "clip" | "siglip"
    model: nn.Module  # in eval mode, on the CPU
    preprocess: ImagePreprocess  # image -> model input, as `vitlab predict` prepares it
    class_names: list[str] | None = None  # None: the dir names no classes (see `labels`)
    tokenizer: object | None = None  # CLIP / SigLIP: texts -> input_ids (None when opened with tokenizer=False)
    origin: str = "vitlab"  # who wrote it: vitlab | vitlab_clip | hf_vit | hf_clip | hf_<model_type> | timm
    files: list[Path] = field(default_factory=list)  # the weights files read
    record: dict | None = None  # train_config.json of a run dir (the trainer's resolved config, plan, data)
    notes: list[str] = field(default_factory=list)  # what was assumed for want of a file

    @property
    def num_classes(self) -> int:
        """Classifier outputs; 0 for a feature extractor and for CLIP / SigLIP (zero-shot, no classifier)."""
        return 0 if self.is_clip else int(getattr(self.model.cfg, "num_classes", 0))

    @property
    def is_clip(self) -> bool:
        return self.kind in CLIP_KINDS

    @property
    def labels(self) -> list[str]:
        """One name per classifier output: the dir's class names when it has them for every output, else "0", "1"..."""
        n = self.num_classes
        return list(self.class_names) if self.class_names and len(self.class_names) == n else [str(i) for i in range(n)]

    @property
    def what(self) -> str:
        return KIND_WORDS.get(self.kind, self.kind)

    def require(self, kinds: tuple[str, ...], command: str) -> ModelDir:
        """This dir, or a one-line error naming what its kind lacks for `command`."""
        if self.kind not in kinds:
            takes = ", ".join(KIND_WORDS.get(k, k) for k in kinds)
            raise VitlabError(f"{self.path} holds a {self.what}; {command} takes a {takes}")
        return self


def open_model_dir(path: str | Path, *, variant: str | None = None, tokenizer: bool = True) -> ModelDir:
    """Load what `path` holds (see the module docstring); every problem is a one-line VitlabError.

    `variant` describes a timm checkpoint that has no config.json (e.g. "Ti/16"); a config.json that
    describes the model excludes it. `tokenizer=False`: a CLIP / SigLIP dir's tokenizer is not loaded (nor
    required), for uses of the image tower alone.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VitlabError(f"{path} not found: {NOT_FOUND}")
    if path.is_file():  # a .safetensors file (pickles and other files are refused, each in its own words)
        from vitlab.convert.files import locate

        locate(path)
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    if config is None and variant is None:
        raise VitlabError(f"{path}: no {CONFIG_NAME} describing the weights ({NOT_FOUND}); for a bare timm file "
                          "pass its vitlab variant (--variant Ti/16)")
    model_type = (config or {}).get("model_type")
    if variant is not None and model_type is not None:
        raise VitlabError(f"{path}: its config.json describes the model (model_type {model_type!r}); drop --variant")
    if model_type is None and (variant or config.get("architecture")):
        md = _open_timm(path, config, variant)
    elif model_type is None or model_type.startswith("vitlab_"):
        md = _open_vitlab(folder, model_type, tokenizer)
    else:
        md = _open_hf(folder, config, tokenizer)
    md.model.float().eval()
    if (folder / RUN_CONFIG).is_file() and path.is_dir():
        md.record = dict(read_json(folder / RUN_CONFIG))
    return md


# ---- vitlab dirs ---------------------------------------------------------------------------------------------
def _open_vitlab(folder: Path, model_type: str | None, tokenizer: bool) -> ModelDir:
    from vitlab.clip.model import MODEL_TYPE as CLIP_TYPE
    from vitlab.distill import TeacherNet
    from vitlab.model.registry import MODEL_CLASSES, load_pretrained

    files = [folder / WEIGHTS_NAME]
    notes: list[str] = []
    if model_type == CLIP_TYPE:
        return _open_clip(folder, origin="vitlab_clip", tokenizer=tokenizer)
    if model_type == TeacherNet.model_type:
        model = TeacherNet.from_pretrained(folder)
        if not (folder / PREPROCESSOR_NAME).is_file():
            raise VitlabError(f"{folder} has no {PREPROCESSOR_NAME}: a CNN teacher's config does not say its input "
                              "size or normalisation")
        return ModelDir(folder, "teacher", model, run_preprocess(folder), model.read_class_names(folder),
                        files=files)
    if model_type is not None and model_type not in MODEL_CLASSES:
        known = ", ".join([*MODEL_CLASSES, TeacherNet.model_type, CLIP_TYPE])
        raise VitlabError(f"{folder / CONFIG_NAME}: model_type {model_type!r} is not a vitlab model; known: {known}")
    model = load_pretrained(folder)  # the registry: ViT, Swin, ... by model_type (none: an early ViT dir)
    kind = type(model).model_type.removeprefix("vitlab_")
    pre = run_preprocess(folder, image_size=model.cfg.image_size, notes=notes)
    return ModelDir(folder, kind, model, pre, model.read_class_names(folder), files=files, notes=notes)


def run_preprocess(folder: str | Path, *, image_size: int | None = None, notes: list[str] | None = None
                   ) -> ImagePreprocess:
    """The run's preprocessor_config.json at the model's `image_size`, with Pillow resampling (`vitlab predict`'s).

    Without the file: resize to image_size x image_size (bicubic), mean = std = 0.5, the Hugging Face ViT default
    (a note says so).
    """
    path = Path(folder) / PREPROCESSOR_NAME
    if not path.is_file():
        if image_size is None:
            raise VitlabError(f"{path} not found")
        if notes is not None:
            notes.append(f"no {PREPROCESSOR_NAME}: images are resized to {image_size}x{image_size} and normalised "
                         "with mean = std = 0.5 (the Hugging Face ViT default)")
        return ImagePreprocess(size=image_size, resize="square", crop_size=None, mean=HALF, std=HALF, backend="pil")
    pre = ImagePreprocess.from_hf(read_preprocessor_config(folder))
    return dataclasses.replace(at_size(pre, image_size), backend="pil")


def at_size(pre: ImagePreprocess, image_size: int | None) -> ImagePreprocess:
    """`pre` with its output at the model's input size (the model decides; None: as it is)."""
    if image_size is None or pre.output_size == image_size:
        return pre
    return dataclasses.replace(pre, size=image_size, crop_size=image_size if pre.crop_size else None)


def _open_clip(folder: Path, *, origin: str, tokenizer: bool, model=None, config: dict | None = None) -> ModelDir:
    """A CLIP / SigLIP dir (vitlab's keeps tokenizer and preprocessing in config.json, Hugging Face's in files)."""
    from vitlab.clip.model import CLIPModel
    from vitlab.clip.tokenizer import load_tokenizer

    config = config if config is not None else read_json(folder / CONFIG_NAME)
    if model is None:
        model = CLIPModel.from_pretrained(folder)
        info = config.get("preprocess")
        pre = ImagePreprocess.from_dict(info) if info else None
    else:
        pre = _hf_preprocess(folder)
    if isinstance(model, CLIPModel):
        kind, size = model.kind, model.cfg.vision.image_size
        tokenizer = load_tokenizer(folder, config.get("tokenizer"), context_length=model.cfg.text.context_length) \
            if tokenizer else None
    else:  # a Hugging Face vision tower alone: a ViT feature extractor
        kind, size, tokenizer = "vit", model.cfg.image_size, None
    if pre is None:  # the family's own preprocessing
        siglip = kind == "siglip" or "siglip" in str(config.get("model_type"))
        pre = siglip_preprocess(size) if siglip else clip_preprocess(size)
    return ModelDir(folder, kind, model, pre, tokenizer=tokenizer, origin=origin, files=[folder / WEIGHTS_NAME])


# ---- Hugging Face dirs ---------------------------------------------------------------------------------------
def _hf_preprocess(folder: Path) -> ImagePreprocess | None:
    path = folder / PREPROCESSOR_NAME
    return ImagePreprocess.from_hf(read_json(path)) if path.is_file() else None


def hf_class_names(config: dict, num_classes: int) -> list[str] | None:
    """id2label of a Hugging Face config.json, or None when it has none or only transformers' LABEL_i placeholders."""
    id2label = config.get("id2label") or {}
    names = [id2label.get(str(i)) for i in range(num_classes)]
    default = [f"LABEL_{i}" for i in range(num_classes)]
    return names if names and None not in names and names != default else None


def _open_hf(folder: Path, config: dict, tokenizer: bool) -> ModelDir:
    from vitlab.convert.files import locate, read_weights
    from vitlab.convert.hf_clip import _MODEL_TYPES as HF_CLIP_TYPES

    model_type = config["model_type"]
    files, _ = locate(folder)
    if model_type in HF_CLIP_TYPES:
        from vitlab.convert.hf_clip import convert_hf_clip

        model = convert_hf_clip(read_weights(files), config)
        md = _open_clip(folder, origin="hf_clip", tokenizer=tokenizer, model=model, config=config)
        md.files = files
        return md
    if model_type == "vit":
        from vitlab.convert.hf_vit import from_hf_vit_state_dict

        model, origin = from_hf_vit_state_dict(read_weights(files), config), "hf_vit"
    else:
        model, origin = _convert_with_transformers(folder, config), f"hf_{model_type}"
    notes: list[str] = []
    hf_pre = _hf_preprocess(folder)  # transformers' own processor, as its pipelines prepare images
    pre = at_size(hf_pre, model.cfg.image_size) if hf_pre else \
        run_preprocess(folder, image_size=model.cfg.image_size, notes=notes)
    kind = type(model).model_type.removeprefix("vitlab_")
    return ModelDir(folder, kind, model, pre, hf_class_names(config, model.cfg.num_classes), origin=origin,
                    files=files, notes=notes)


def _convert_with_transformers(folder: Path, config: dict) -> nn.Module:
    """A Hugging Face family vitlab reads through transformers' own model: built from the dir, then `from_hf`."""
    from vitlab.convert import from_hf

    model_type = config["model_type"]
    cant = (f"{folder / CONFIG_NAME}: model_type {model_type!r} is not a model vitlab can open (vitlab, Hugging Face "
            "ViT / CLIP / SigLIP, or timm)")
    arch = (config.get("architectures") or [None])[0]
    try:
        import transformers
    except ImportError:
        raise VitlabError(f"{cant}; reading other Hugging Face families needs transformers") from None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise VitlabError(cant)
    try:
        hf_model = cls.from_pretrained(folder).eval()
        return from_hf(hf_model)
    except VitlabError as e:
        raise VitlabError(f"{cant}: {e}") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise VitlabError(f"{cant}: transformers cannot load it ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None


# ---- timm files ----------------------------------------------------------------------------------------------
def _open_timm(path: Path, config: dict | None, variant: str | None) -> ModelDir:
    from vitlab.convert.files import convert_timm, locate, read_weights

    files, _ = locate(path)
    model, labels = convert_timm(read_weights(files), config, variant=variant)
    kind = type(model).model_type.removeprefix("vitlab_")
    pre = timm_preprocess(config or {}, model.cfg.image_size)
    notes = [] if (config or {}).get("pretrained_cfg") else \
        ["no timm pretrained_cfg: images are resized and normalised with mean = std = 0.5"]
    return ModelDir(files[0].parent, kind, model, pre, labels, origin="timm", files=files, notes=notes)


def timm_preprocess(config: dict, image_size: int) -> ImagePreprocess:
    """timm's eval transform from a hub config.json's pretrained_cfg: resize to floor(size / crop_pct) (the shortest
    edge, or both sides for crop_mode "squash"), centre crop `image_size`, normalise with its mean / std."""
    pc = config.get("pretrained_cfg") or {}
    mode = pc.get("crop_mode", "center" if pc else "squash")  # without a pretrained_cfg: resize only
    crop_pct = float(pc.get("crop_pct") or 1.0)
    resample = pc.get("interpolation") if pc.get("interpolation") in RESAMPLE else "bicubic"
    return ImagePreprocess(size=math.floor(image_size / crop_pct),
                           resize="square" if mode == "squash" else "shortest_edge",
                           crop_size=image_size, resample=resample, mean=tuple(pc.get("mean") or HALF),
                           std=tuple(pc.get("std") or HALF), backend="pil")
