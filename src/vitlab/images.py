"""`open_image`: the one way vitlab reads an image (predict, explain, zeroshot, image folders, the demo).

- A pixel limit (default 50 million, `VITLAB_MAX_IMAGE_PIXELS` or `max_pixels=` to change it; Pillow
  itself only warns at 89M and refuses at 179M) is checked on the header, before any decoding: a
  decompression bomb or a giant scan is a one-line error, not gigabytes of memory.
- With `target_size` (the size the caller resizes to) a file of at least 8x that is downscaled while
  decoding: JPEG by its decoder's 1/2, 1/4, 1/8 scaling (`Image.draft`), other formats by `Image.reduce`,
  by the largest factor that keeps the short side >= 4 x target_size, so the caller's antialiased resize
  still sees plenty of pixels (tests/test_images.py bounds the change: about one 8-bit level on average).
- 16-bit and float images (modes I;16, I, F) are scaled to 8 bits, never clipped: 16-bit values / 257,
  floats in [0, 1] x 255, other ranges min-max. A mid-gray 16-bit PNG gives mid-gray pixels (Pillow's
  own convert("RGB") clips it to white, and so does every library that calls it, Hugging Face's included).
- EXIF orientation IS applied to files (`ImageOps.exif_transpose`), as Hugging Face's `load_image` (used
  by its pipelines) does, so a phone photo is seen upright and vitlab's predictions on a file equal the
  pipeline's. PIL images and arrays passed in are used as given, as HF's image processors do.
Any unreadable, truncated or non-image file, and any image over the limit, is a VitlabError naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlab.errors import VitlabError

DEFAULT_MAX_PIXELS = 50_000_000
DECODE_MARGIN = 4  # decode at >= 4x the target size
MAX_PIXELS_ENV = "VITLAB_MAX_IMAGE_PIXELS"

ImageSource = Image.Image | np.ndarray | str | os.PathLike


def max_image_pixels() -> int:
    """The pixel limit: $VITLAB_MAX_IMAGE_PIXELS if set (a positive integer), else 50 million."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit < 1:
        raise VitlabError(f"{MAX_PIXELS_ENV}={value!r} must be a positive number of pixels")
    return limit


def open_image(source: ImageSource, *, target_size: int | None = None, max_pixels: int | None = None
               ) -> Image.Image:
    """A decoded PIL image from a path, a PIL image or a uint8 array (H, W[, C]), in an 8-bit mode.

    The mode is kept otherwise (L, RGB, RGBA, P, CMYK, ...): RGB conversion, and how it treats
    transparency, is the caller's (`vitlab.preprocess.to_rgb`).
    """
    if isinstance(source, Image.Image):  # already decoded: used as given (HF's processors do the same)
        return to_8bit(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise VitlabError(f"image arrays must be uint8 (H, W) or (H, W, C), got {source.dtype} {source.shape}")
        return Image.fromarray(source)
    path, limit = Path(source), max_pixels or max_image_pixels()
    min_size = DECODE_MARGIN * target_size if target_size else None
    if not path.is_file():
        raise VitlabError(f"image {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning (we check first), palette notes
            with Image.open(path) as im:
                _check_pixels(im.size, limit, f"image {path}")
                if min_size and im.format == "JPEG":
                    im.draft(im.mode, (min_size, min_size))  # the decoder downscales by 1/2, 1/4 or 1/8
                im.load()
                im = ImageOps.exif_transpose(im)  # a copy: the file closes here
            return to_8bit(_reduce(im, min_size))
    except VitlabError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own limit, which Image.open checks first
        raise VitlabError(f"image {path}: {e} (vitlab's limit is {limit / 1e6:g} million pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise VitlabError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _check_pixels(size: tuple[int, int], limit: int, what: str) -> None:
    w, h = size
    if w * h > limit:
        raise VitlabError(f"{what} is {w}x{h} = {w * h / 1e6:.1f} million pixels, over the limit of "
                          f"{limit / 1e6:g} million (a decompression bomb?); set {MAX_PIXELS_ENV} to allow more")


def _reduce(im: Image.Image, min_size: int | None) -> Image.Image:
    """Shrink by the largest integer factor that keeps the short side >= min_size (box filter)."""
    factor = min(im.size) // min_size if min_size else 1
    if factor < 2:
        return im
    if im.mode.startswith("I;16"):
        im = im.convert("I")
    elif im.mode not in _REDUCIBLE:  # P, 1, PA, ...: reduce averages real-valued bands only
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    return im.reduce(factor)


_REDUCIBLE = ("L", "LA", "I", "F", "RGB", "RGBA", "CMYK", "YCbCr")


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit integer and float single-band images -> mode L, scaled to 0..255 (not clipped)."""
    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return im
    x = np.asarray(im).astype(np.float64)  # (H, W)
    if im.mode.startswith("I;16") or (im.mode == "I" and x.size and x.min() >= 0 and x.max() <= 65535):
        x = x / 257.0  # 65535 -> 255, exactly the 16 -> 8 bit mapping
    elif im.mode == "F" and x.size and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1:
        x = x * 255.0
    else:  # an unknown range: stretch what is there
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    out = Image.fromarray(np.rint(x).astype(np.uint8), "L")
    out.info = {k: v for k, v in im.info.items() if k != "transparency"}  # a 16-bit key means nothing in L
    return out
