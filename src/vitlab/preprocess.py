"""Image preprocessing of CLIP and SigLIP, the same pixels transformers' image processors produce.

CLIP: resize the shortest edge to 224 (bicubic), centre crop 224x224, scale to [0, 1], normalise with
OpenAI's mean/std. SigLIP: resize to 224x224 (bicubic, aspect ratio not kept), scale, normalise with 0.5/0.5.
Both first convert to RGB, compositing any transparency onto white. Files are opened by
`vitlab.images.open_image` (pixel limit, 16-bit scaling, EXIF orientation, downscaling of files 8x or more
larger than the output while decoding: see there).

Two resampling backends, each equal (to float rounding) to one of transformers 5's processors:
"torch" (default): torch's uint8 antialiased kernel, as the default `CLIPImageProcessor` /
`SiglipImageProcessor` (torchvision backend) on CPU. "pil": Pillow's `Image.resize`, as
`CLIPImageProcessorPil` / `SiglipImageProcessorPil` and OpenAI's original CLIP pipeline. The two kernels
round differently: on photos 0.2-0.4% of the values differ by one 8-bit level, for some sizes up to ~20%
by up to 3 levels (tests/test_preprocess.py measures it). Decoding and RGB conversion are Pillow's in both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.errors import VitlabError, check_fields
from vitlab.images import ImageSource, open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP / HF ViT "standard" mean and std
RESIZE_MODES = ("shortest_edge", "square")
# Pillow filters by name; transformers stores them as these integers (PIL's enum values).
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# torch's modes for the filters it has (transformers maps PIL's NEAREST to torchvision's NEAREST_EXACT)
TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
BACKENDS = ("torch", "pil")

ImageLike = ImageSource


@dataclass
class ImagePreprocess:
    """Resize, optional centre crop, scale to [0, 1], normalise -> float32 (B, 3, H, W).

    resize "shortest_edge": the short side becomes `size`, the long one int(size * long / short) (transformers'
    rule); "square": both sides become `size`. crop_size: centre crop after resizing (None: no crop).
    """

    size: int = 224
    resize: str = "shortest_edge"
    crop_size: int | None = 224
    resample: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    backend: str = "torch"  # torch | pil: whose resampling (see the module docstring)

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.resize not in RESIZE_MODES:
            raise VitlabError(f"resize {self.resize!r} unknown; choose one of {RESIZE_MODES}")
        if self.resample not in RESAMPLE:
            raise VitlabError(f"resample {self.resample!r} unknown; choose one of {sorted(RESAMPLE)}")
        if self.backend not in BACKENDS:
            raise VitlabError(f"backend {self.backend!r} unknown; choose one of {BACKENDS}")
        if self.backend == "torch" and self.resample not in TORCH_MODES:
            raise VitlabError(f"resample {self.resample!r} needs backend 'pil' (torch has {sorted(TORCH_MODES)})")
        if self.size < 1 or (self.crop_size is not None and self.crop_size < 1):
            raise VitlabError(f"size and crop_size must be positive, got {self.size} and {self.crop_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise VitlabError(f"mean and std need 3 values each (std > 0), got {self.mean} and {self.std}")

    @property
    def output_size(self) -> int:
        return self.crop_size if self.crop_size is not None else self.size

    # ---- the steps ----------------------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing an image of this size."""
        if self.resize == "square":
            return self.size, self.size
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def prepare(self, image: ImageLike) -> np.ndarray:
        """One image -> uint8 (H, W, 3) after RGB conversion, resize and crop (before normalisation)."""
        img = to_rgb(open_image(image, target_size=self.size))
        (w, h), (old_w, old_h) = self.resized_size(*img.size), img.size
        if (w, h) == (old_w, old_h):
            pixels = np.asarray(img)  # (H, W, 3) uint8
        elif self.backend == "pil":
            pixels = np.asarray(img.resize((w, h), RESAMPLE[self.resample]))
        else:
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W) uint8
            smooth = self.resample != "nearest"  # antialiased kernels as torchvision (they differ only when shrinking)
            x = F.interpolate(x, size=(h, w), mode=TORCH_MODES[self.resample], antialias=smooth,
                              align_corners=False if smooth else None)
            pixels = x[0].permute(1, 2, 0).numpy()  # (h, w, 3) uint8
        return pixels if self.crop_size is None else center_crop(pixels, self.crop_size)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): scale, subtract mean, divide by std."""
        x = pixels.astype(np.float32) * np.float32(self.rescale_factor)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))

    def __call__(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """One image or a list -> float32 (B, 3, S, S) model input."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise VitlabError("no images to preprocess")
        return self.normalize(np.stack([self.prepare(im) for im in images]))  # (B, 3, S, S)

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImagePreprocess:
        check_fields(cls, d, "ImagePreprocess")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict) -> ImagePreprocess:
        """From a transformers `preprocessor_config.json` dict (CLIP / SigLIP / ViT image processors)."""
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size} if d.get("default_to_square") is False else {"height": size, "width": size}
        if "shortest_edge" in size:
            kw = dict(size=int(size["shortest_edge"]), resize="shortest_edge")
        elif size.get("height") == size.get("width") and size.get("height"):
            kw = dict(size=int(size["height"]), resize="square")
        else:
            raise VitlabError(f"image processor size {size} is not supported (need shortest_edge or a square)")
        if not d.get("do_resize", True):
            raise VitlabError("image processors without resizing are not supported")
        crop = None
        if d.get("do_center_crop", False):
            c = d.get("crop_size", 224)
            c = {"height": c, "width": c} if isinstance(c, int) else c
            if c.get("height") != c.get("width"):
                raise VitlabError(f"non-square crop_size {c} is not supported")
            crop = int(c["height"])
        names = {int(v): k for k, v in RESAMPLE.items()}
        resample = names.get(int(d.get("resample", 2)))
        if resample is None:
            raise VitlabError(f"resample {d.get('resample')!r} is not a Pillow filter")
        normalize = d.get("do_normalize", True)
        mean = tuple(d.get("image_mean", HALF)) if normalize else (0.0, 0.0, 0.0)
        std = tuple(d.get("image_std", HALF)) if normalize else (1.0, 1.0, 1.0)
        factor = float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0
        backend = "torch" if resample in TORCH_MODES else "pil"  # transformers 5 defaults to torchvision
        return cls(**kw, crop_size=crop, resample=resample, mean=mean, std=std, rescale_factor=factor,
                   backend=backend)


def clip_preprocess(size: int = 224, *, backend: str = "torch") -> ImagePreprocess:
    """OpenAI CLIP: shortest edge `size` bicubic, centre crop `size`, OpenAI mean/std."""
    return ImagePreprocess(size=size, resize="shortest_edge", crop_size=size, mean=CLIP_MEAN, std=CLIP_STD,
                           backend=backend)


def siglip_preprocess(size: int = 224, *, backend: str = "torch") -> ImagePreprocess:
    """SigLIP: resize to size x size bicubic (no crop), mean/std 0.5."""
    return ImagePreprocess(size=size, resize="square", crop_size=None, mean=HALF, std=HALF, backend=backend)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels (alpha band or palette transparency) composited onto white, as HF does."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C) around the centre; a side shorter than `size` is zero-padded first."""
    h, w = pixels.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        pixels = np.pad(pixels, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = int((h - size) / 2.0), int((w - size) / 2.0)
    return pixels[top:top + size, left:left + size]
