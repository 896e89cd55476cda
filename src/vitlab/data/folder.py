"""Image-folder datasets (`root/<class>/*.png`, optionally under `train/` and `test/`/`val/`), decoded once.

Decoding thousands of JPEGs takes minutes on a small CPU, so the decoded uint8 tensor is cached as a
.safetensors file keyed by a hash of the file list, sizes and mtimes: the second load is a single file read,
and editing, adding or removing an image invalidates the cache automatically.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vitlab.data.dataset import ImageDataset
from vitlab.data.paths import cache_root
from vitlab.errors import VitlabError
from vitlab.images import open_image
from vitlab.weights import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
CACHE_VERSION = 2  # bump when decoding changes, so old caches are not reused (2: vitlab.images.open_image)


def load_image_folder(
    root: str | Path,
    split: str | None = None,
    *,
    size: int = 32,
    cache_dir: str | Path | None = None,
    allow_empty_classes: bool = False,
) -> ImageDataset:
    """Images under `root/<class>/` (or `root/<split>/<class>/`) as RGB uint8 (N, 3, size, size).

    Each image is converted to RGB, its shorter side resized to `size` (bicubic) and centre-cropped square.
    Class names are the sorted sub-folder names; with split folders they come from `train/`, so train and
    test agree on label numbers. `split=None` reads `root` itself; "train" falls back to `root` when there are
    no split folders. Unreadable files are skipped with one warning. The result is cached in `cache_dir`
    (default `~/.cache/vitlab/folders`). A training class folder with no images is an error (a warning naming
    it with `allow_empty_classes`): it would silently become a class no image teaches.
    """
    top, files, labels, classes = list_image_folder(root, split, allow_empty_classes=allow_empty_classes)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "folders"
    cache_file = cache / f"{top.name}-{_fingerprint(top, files, labels, size)}.safetensors"
    try:
        dataset, skipped = _read_cache(cache_file)
    except Exception:  # no cache yet, or an unreadable one: decode
        images, kept_labels, skipped = _decode_all(files, labels, size, desc=f"decoding {top}")
        if len(images) == 0:
            raise VitlabError(f"no readable images under {top}: {len(skipped)} unreadable, e.g. {skipped[0]}") from None
        dataset = ImageDataset(images, kept_labels, classes)
        _write_cache(cache_file, dataset, skipped)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {top}, e.g. {skipped[0]}", stacklevel=2)
    return dataset


def list_image_folder(
    root: str | Path, split: str | None = None, *, allow_empty_classes: bool = False,
) -> tuple[Path, list[Path], list[int], list[str]]:
    """(folder holding the class folders, image paths, labels, class names) of `split`; nothing is decoded."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VitlabError(f"image folder {root} does not exist or is not a directory")
    top = _split_dir(root, split)
    classes = _class_names(root / "train" if top != root and (root / "train").is_dir() else top)
    files, labels = _list_images(top, classes)
    if top == root / "train" or top == root:  # the classes come from this folder: an empty one is no class
        _check_empty_classes(top, classes, labels, allow=allow_empty_classes)
    return top, files, labels, classes


def _check_empty_classes(top: Path, classes: list[str], labels: list[int], *, allow: bool) -> None:
    empty = [name for i, name in enumerate(classes) if i not in set(labels)]
    if not empty:
        return
    what = f"{len(empty)} class folder(s) with no images under {top}: {', '.join(str(top / n) for n in empty)}"
    if not allow:
        raise VitlabError(f"{what}; add images, remove the folder(s), or pass --allow-empty-classes to keep "
                          "them as classes")
    warnings.warn(f"{what}; kept as classes (--allow-empty-classes)", stacklevel=3)


def _split_dir(root: Path, split: str | None) -> Path:
    """The folder holding the class folders for `split`."""
    if split is None:
        return root
    if split not in SPLIT_DIRS:
        raise VitlabError(f"image-folder split must be one of {', '.join(SPLIT_DIRS)}, not {split!r}")
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    if split == "train" and not any((root / d).is_dir() for d in ("test", "val")):
        return root  # a plain folder of classes is a training set
    raise VitlabError(f"{root} has no {' or '.join(SPLIT_DIRS[split])} folder for the {split} split")


def _class_names(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise VitlabError(f"no class folders in {folder}: expected {folder}/<class>/*.png (or .jpg, ...)")
    return classes


def _list_images(top: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image paths (sorted, recursive) and their labels; class folders under `top` must be known classes."""
    unknown = sorted({p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")} - set(classes))
    if unknown:
        raise VitlabError(f"{top / unknown[0]}: class folder not in the training classes ({len(classes)} found)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (top / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        files += found
        labels += [label] * len(found)
    if not files:
        raise VitlabError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {top}")
    return files, labels


def _fingerprint(top: Path, files: list[Path], labels: list[int], size: int) -> str:
    """Hash of everything the decoded tensor depends on: paths, labels, file sizes and mtimes, output size."""
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size} root={top.resolve()}\n".encode())
    for path, label in zip(files, labels):
        st = path.stat()
        h.update(f"{path.relative_to(top)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def open_rgb(path: str | Path, size: int) -> Image.Image:
    """One image file as an RGB PIL image, opened by `vitlab.images.open_image`, which downscales files of
    8x `size` or more while decoding (also the streaming loader's opener, vitlab.data.stream)."""
    im = open_image(path, target_size=size)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency must go through RGBA to convert cleanly
    return im.convert("RGB")


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """One image file -> RGB uint8 (size, size, 3): shorter side resized to `size`, centre crop, bicubic."""
    return np.asarray(ImageOps.fit(open_rgb(path, size), (size, size), method=Image.Resampling.BICUBIC))


def _decode_all(
    files: list[Path], labels: list[int], size: int, *, desc: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every file; returns images (n, 3, size, size), labels (n,) and "path (error)" per skipped file."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)  # (N, H, W, 3)
    ok, skipped = [], []
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", leave=False)):
        try:
            out[i] = decode_image(path, size)
            ok.append(i)
        except VitlabError as e:  # open_image's message names the file and the problem
            skipped.append(str(e))
        except OSError as e:  # e.g. a truncated file that decodes only partly
            skipped.append(f"{path} ({type(e).__name__}: {e})")
    images = torch.from_numpy(out[ok]).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)
    return images, torch.tensor([labels[i] for i in ok], dtype=torch.int64), skipped


def _write_cache(path: Path, dataset: ImageDataset, skipped: list[str]) -> None:
    """Save atomically (temp file + rename) so a concurrent or interrupted run never sees half a file."""
    metadata = {"classes": json.dumps(dataset.classes), "skipped": json.dumps(skipped)}
    tensors = {"images": dataset.images, "labels": dataset.labels}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except OSError as e:  # a read-only cache only costs speed
        warnings.warn(f"could not write image cache {path}: {e}", stacklevel=3)


def _read_cache(path: Path) -> tuple[ImageDataset, list[str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
    return ImageDataset(images, labels, json.loads(metadata["classes"])), json.loads(metadata["skipped"])
