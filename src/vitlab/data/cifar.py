"""CIFAR-10 and CIFAR-100 readers for both official layouts, from a directory or the official .tar.gz.

Not found, and looked for in vitlab's cache dir (neither --data nor $VITLAB_DATA set), the binary archive
is downloaded there by default (MD5-checked, atomic, with a progress bar); `download=False` (--no-download)
refuses, `download=True` downloads into any directory. `URL` and each spec's `archives` (name, MD5) are
module constants, so a test or a mirror can point them elsewhere.

Binary layout (`*.bin`): fixed-size records of label byte(s) + 3072 pixel bytes (1024 R, 1024 G, 1024 B, each
a row-major 32x32 plane), parsed with one `np.frombuffer` + reshape. Python layout: pickled dicts, read with
an unpickler that can only rebuild numpy arrays, so a tampered file cannot run code.
See https://www.cs.toronto.edu/~kriz/cifar.html for both formats.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch

from vitlab.data.dataset import ImageDataset
from vitlab.data.download import download_file, md5sum
from vitlab.data.paths import DATA_ENV, is_cache_dir, resolve_data_dir
from vitlab.errors import VitlabError
from vitlab.weights import atomic_write

try:  # numpy >= 2 moved the modules; pickles name either one
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel pixel mean/std over the training split, images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

URL = "https://www.cs.toronto.edu/~kriz/"
PIXELS = 3 * 32 * 32  # bytes per image
MAX_MEMBER = 256 << 20  # the largest official file is 154 MB; a bigger archive member is not CIFAR


@dataclass(frozen=True)
class CifarSpec:
    """Everything that differs between CIFAR-10 and CIFAR-100 (fine or coarse labels)."""

    title: str  # for messages
    key: str  # cache sub-directory name
    num_classes: int
    splits: dict[str, tuple[str, ...]]  # split -> python-layout file names; binary ones add ".bin"
    label_key: str  # python layout: labels list in each batch dict
    names_key: str  # python layout: class-name list in the meta dict
    meta_file: str  # python layout
    names_file: str  # binary layout: one class name per line
    label_bytes: int  # binary layout: label bytes before the pixels of each record
    label_byte: int  # binary layout: which of those bytes is ours
    subdirs: dict[str, str]  # layout -> official folder name inside the archive
    archives: dict[str, tuple[str, str]]  # layout -> (archive file name, MD5)


CIFAR10 = CifarSpec(
    "CIFAR-10", "cifar10", 10,
    splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key="labels", names_key="label_names", meta_file="batches.meta", names_file="batches.meta.txt",
    label_bytes=1, label_byte=0,
    subdirs={"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"},
    archives={"binary": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
              "python": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")},
)
CIFAR100 = CifarSpec(
    "CIFAR-100", "cifar100", 100,
    splits={"train": ("train",), "test": ("test",)},
    label_key="fine_labels", names_key="fine_label_names",
    meta_file="meta", names_file="fine_label_names.txt",
    label_bytes=2, label_byte=1,
    subdirs={"binary": "cifar-100-binary", "python": "cifar-100-python"},
    archives={"binary": ("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8"),
              "python": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")},
)
CIFAR100_COARSE = replace(
    CIFAR100, title="CIFAR-100 (coarse labels)", num_classes=20, label_key="coarse_labels",
    names_key="coarse_label_names", names_file="coarse_label_names.txt", label_byte=0,
)


def load_cifar10(
    root: str | Path | None = None, split: str = "train", *, download: bool | None = None
) -> ImageDataset:
    """CIFAR-10 `split` ("train": 50,000 images, "test": 10,000) as uint8 (N, 3, 32, 32) + int64 labels.

    `root` is a directory holding the batch files (directly or in the official sub-folder) or an official
    .tar.gz; None means `$VITLAB_DATA`, else the cache dir. When the files are missing, `download=None`
    fetches the binary archive into the cache dir only, True into `root` too, False never.
    """
    return load_cifar(CIFAR10, root, split, download=download)


def load_cifar100(
    root: str | Path | None = None,
    split: str = "train",
    *,
    labels: Literal["fine", "coarse"] = "fine",
    download: bool | None = None,
) -> ImageDataset:
    """CIFAR-100 `split` with its 100 fine labels (or the 20 coarse super-classes); see `load_cifar10`."""
    if labels not in ("fine", "coarse"):
        raise VitlabError(f"CIFAR-100 labels must be 'fine' or 'coarse', got {labels!r}")
    return load_cifar(CIFAR100 if labels == "fine" else CIFAR100_COARSE, root, split, download=download)


def load_cifar(
    spec: CifarSpec, root: str | Path | None, split: str, *, download: bool | None = None
) -> ImageDataset:
    """Read `split` of the dataset `spec` describes; the shared body of `load_cifar10` / `load_cifar100`."""
    if split not in spec.splits:
        raise VitlabError(f"{spec.title} has splits {' and '.join(spec.splits)}, not {split!r}")
    *batches, (meta, raw, where) = _find_files(spec, resolve_data_dir(root, spec.key), split, download)
    if meta.endswith(".txt"):
        classes = _parse_names_txt(raw, where)
    else:
        classes = _parse_meta_pickle(raw, where, spec.names_key)
    if len(classes) != spec.num_classes:
        raise VitlabError(f"{where}: expected {spec.num_classes} class names, got {len(classes)}")
    parts = [_parse_batch(spec, raw, where, binary=name.endswith(".bin")) for name, raw, where in batches]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32), one contiguous copy
    labels = np.concatenate([p[1] for p in parts])  # (N,)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


# ---------------------------------------------------------------- finding the files


def _find_files(spec: CifarSpec, root: Path, split: str, download: bool | None) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, where for messages) of the split's batch files, then of the class-names file.

    Looks in `root`, then its official sub-folders, then for an official archive inside it, preferring the
    binary layout (no pickle at all).
    """
    if root.is_file():
        return _read_archive(spec, root, split)
    for folder in (root, *(root / d for d in spec.subdirs.values())):
        for layout in ("binary", "python"):
            names = _layout_names(spec, split, layout)
            if (folder / names[0]).is_file():
                return [(n, _read(folder / n), str(folder / n)) for n in names]
    corrupt = ""  # what was wrong with an archive in the cache dir, moved aside to be fetched again
    for archive, md5 in spec.archives.values():
        if (root / archive).is_file():
            if not is_cache_dir(root, spec.key):  # a folder the user named: read as is, never moved
                return _read_user_archive(spec, root / archive, split, md5)
            if (got := md5sum(root / archive)) == md5:
                return _read_archive(spec, root / archive, split)
            aside = _move_aside(root / archive)
            corrupt = f"{root / archive} was corrupt (MD5 {got}, expected {md5}) and was moved aside to {aside.name}; "
            break
    archive, md5 = spec.archives["binary"]
    if not (download or (download is None and is_cache_dir(root, spec.key))):
        raise VitlabError(
            f"{corrupt}no {spec.title} data in {root}: put the official binary or python files (or {archive}) there, "
            f"or point --data / {DATA_ENV} at them, or download them (vitlab train --download, or download=True)"
        )
    files = ", ".join(dict.fromkeys(n for split_ in spec.splits for n in _layout_names(spec, split_, "binary")))
    hint = f"put {archive} or its files ({files}) in {root}, or set {DATA_ENV} to a folder holding them"
    try:
        path = download_file(URL + archive, root / archive, md5=md5, hint=hint)
    except VitlabError as e:
        raise VitlabError(corrupt + str(e)) from None
    _unpack_binary(spec, path, root / spec.subdirs["binary"])
    return _find_files(spec, root, split, download=False)


def _move_aside(path: Path) -> Path:
    """Rename a corrupt cache file to `<name>.corrupt-<UTC time>`: kept for a look, out of every later run's way."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    try:
        path.rename(aside)
    except OSError as e:
        raise VitlabError(f"{path} is corrupt and cannot be moved aside ({e.strerror or e}); delete it") from None
    return aside


def _read_user_archive(spec: CifarSpec, archive: Path, split: str, md5: str) -> list[tuple[str, bytes, str]]:
    """An archive in a folder the user named: read as is; when unreadable, say it is corrupt and leave it there."""
    try:
        return _read_archive(spec, archive, split)
    except VitlabError as e:
        if (got := md5sum(archive)) == md5:
            raise
        raise VitlabError(f"{e}; {archive} is corrupt (MD5 {got}, expected {md5}) and, being in a folder you named, "
                          "was left in place: replace it with a good copy or delete it") from None


def _layout_names(spec: CifarSpec, split: str, layout: str) -> list[str]:
    """The split's batch files in `layout`, then the file with the class names."""
    if layout == "binary":
        return [n + ".bin" for n in spec.splits[split]] + [spec.names_file]
    return [*spec.splits[split], spec.meta_file]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise VitlabError(f"cannot read {path}: {e.strerror or e}") from None


def _read_archive(spec: CifarSpec, archive: Path, split: str) -> list[tuple[str, bytes, str]]:
    """The split's files read straight out of an official archive, binary layout preferred."""
    layouts = [_layout_names(spec, split, layout) for layout in ("binary", "python")]
    found = _archive_members(archive, spec, keep={n for names in layouts for n in names}.__contains__)
    for names in layouts:
        if names[0] in found:
            missing = [n for n in names if n not in found]
            if missing:
                raise VitlabError(f"{archive}: missing {', '.join(missing)}")
            return [(n, found[n], f"{archive}:{n}") for n in names]
    raise VitlabError(f"{archive}: no {spec.title} {split} files ({layouts[0][0]} or {layouts[1][0]})")


def _archive_members(archive: Path, spec: CifarSpec, *, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Bytes of the regular files whose name passes `keep`, in one streaming pass, nothing written to disk.

    Members count at the top level or in the official sub-folder. A member path that is absolute or climbs
    out with `..` means a tampered archive, so the whole archive is refused.
    """
    folders = {".", *spec.subdirs.values()}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or "\\" in member.name:
                    raise VitlabError(f"{archive}: unsafe member path {member.name!r}; refusing the archive")
                name, folder = path.name, str(path.parent)
                if member.isfile() and keep(name) and folder in folders and name not in found:
                    if member.size > MAX_MEMBER:
                        raise VitlabError(f"{archive}: member {member.name} is {member.size} bytes, too big for CIFAR")
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VitlabError(f"{archive}: not a readable tar archive ({e})") from None
    return found


def _unpack_binary(spec: CifarSpec, archive: Path, dest: Path) -> None:
    """Write the binary files of a freshly downloaded archive to `dest`, then drop the archive.

    Every later load then reads plain files (~0.1 s) instead of decompressing 160 MB (~2 s). Only the bare
    names of .bin/.txt members are written, inside `dest` and each atomically, so nothing lands elsewhere.
    """
    found = _archive_members(archive, spec, keep=lambda name: name.endswith((".bin", ".txt")))
    missing = [n for split in spec.splits for n in _layout_names(spec, split, "binary") if n not in found]
    if missing:
        raise VitlabError(f"{archive}: missing {', '.join(missing)}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in found:
            atomic_write(dest / name, lambda tmp, data=found[name]: Path(tmp).write_bytes(data))
        archive.unlink()
    except OSError as e:
        raise VitlabError(f"cannot unpack {archive} into {dest}: {e.strerror or e}") from None


# ---------------------------------------------------------------- parsing


def _parse_batch(spec: CifarSpec, raw: bytes, where: str, *, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images (n, 3, 32, 32) uint8 view, labels (n,) int64), checked."""
    if binary:
        record = spec.label_bytes + PIXELS
        if len(raw) == 0 or len(raw) % record:
            raise VitlabError(f"{where}: {len(raw)} bytes is not a whole number of {record}-byte records "
                              "(truncated or not a CIFAR binary file)")
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)  # (n, label bytes + 3072)
        labels = rows[:, spec.label_byte].astype(np.int64)
        data = rows[:, spec.label_bytes :]
    else:
        batch = _load_pickle(raw, where)
        data, labels = batch.get("data"), batch.get(spec.label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (PIXELS,)):
            raise VitlabError(f"{where}: 'data' is not a uint8 (N, {PIXELS}) array")
        try:
            labels = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            labels = None
        if labels is None or labels.shape != data.shape[:1]:
            raise VitlabError(f"{where}: '{spec.label_key}' is missing or does not have one label per image")
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        i = int(bad.argmax())
        raise VitlabError(f"{where}: label {labels[i]} of record {i} is outside 0..{spec.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _parse_names_txt(raw: bytes, where: str) -> list[str]:
    try:
        return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise VitlabError(f"{where}: class-name file is not UTF-8 text") from None


def _parse_meta_pickle(raw: bytes, where: str, names_key: str) -> list[str]:
    names = _load_pickle(raw, where).get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise VitlabError(f"{where}: no '{names_key}' list of class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it to rebuild bytes; only the latin-1 form."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, numbers, strings and numpy arrays, and nothing else.

    `pickle.load` would call any importable function the file names (os.system, ...); CIFAR batches only
    need numpy's array reconstruction, so every other global is refused.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickles written by numpy 1.x / Python 2
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _load_pickle(raw: bytes, where: str) -> dict[str, object]:
    """Unpickle a CIFAR python-layout file safely; byte-string keys (Python 2 pickles) become str."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed input: truncated, garbage, forbidden global
        raise VitlabError(f"{where}: not a readable CIFAR python file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise VitlabError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
