"""CIFAR readers: both official layouts, directories and archives, safe unpickling, clear errors, real data."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    cifar,
    load_cifar10,
    load_cifar100,
    load_dataset,
    resolve_data_dir,
)
from vitlab.errors import VitlabError

# ---------------------------------------------------------------- synthetic official-format files


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us override how strings are written
    """Writes every str/bytes as BINSTRING, as Python 2's cPickle did, so files look like the official ones."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_str
    dispatch[bytes] = save_str


def dump_pickle(obj, *, py2: bool) -> bytes:
    if not py2:
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1.x name


SPLITS = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}


def synthetic(name: str, *, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """file -> (data (n, 3072) uint8, labels (n,), coarse labels (n,)): a tiny dataset, n differing per file."""
    rng = np.random.default_rng(seed)
    files = SPLITS[name]["train"] + SPLITS[name]["test"]
    classes = 10 if name == "cifar10" else 100
    return {
        f: (rng.integers(0, 256, (3 + i, 3072), dtype=np.uint8), rng.integers(0, classes, 3 + i),
            rng.integers(0, 20, 3 + i))
        for i, f in enumerate(files)
    }


def class_names(name: str, coarse: bool = False) -> list[str]:
    return [f"{'super' if coarse else 'class'}_{i}" for i in range(20 if coarse else 10 if name == "cifar10" else 100)]


def layout_files(name: str, layout: str, *, py2: bool = True, seed: int = 0) -> dict[str, bytes]:
    """File name -> bytes of a complete official-layout dataset."""
    out = {}
    for f, (data, labels, coarse) in synthetic(name, seed=seed).items():
        if layout == "binary":
            head = [labels] if name == "cifar10" else [coarse, labels]
            out[f + ".bin"] = np.concatenate([np.stack(head, 1).astype(np.uint8), data], 1).tobytes()
        else:
            d = {"batch_label": f"batch {f}", "data": data, "filenames": [f"img_{i}.png" for i in range(len(data))]}
            if name == "cifar10":
                d["labels"] = labels.tolist()
            else:
                d["fine_labels"], d["coarse_labels"] = labels.tolist(), coarse.tolist()
            out[f] = dump_pickle(d, py2=py2)
    if layout == "binary" and name == "cifar10":
        out["batches.meta.txt"] = "\n".join(class_names(name)).encode() + b"\n"
    elif layout == "binary":
        out["fine_label_names.txt"] = "\n".join(class_names(name)).encode()
        out["coarse_label_names.txt"] = "\n".join(class_names(name, coarse=True)).encode()
    elif name == "cifar10":
        out["batches.meta"] = dump_pickle({"label_names": class_names(name), "num_cases_per_batch": 10}, py2=py2)
    else:
        meta = {"fine_label_names": class_names(name), "coarse_label_names": class_names(name, coarse=True)}
        out["meta"] = dump_pickle(meta, py2=py2)
    return out


def write_dir(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def write_tar(path: Path, files: dict[str, bytes], prefix: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}" if prefix else name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def expected(name: str, split: str, coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels a reader must return, straight from the synthetic arrays."""
    parts = [synthetic(name)[f] for f in SPLITS[name][split]]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[2] if coarse else p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def assert_dataset(ds, name: str, split: str, coarse: bool = False) -> None:
    images, labels = expected(name, split, coarse)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous() and ds.images.shape[1:] == (3, 32, 32)
    assert ds.labels.dtype == torch.int64
    assert torch.equal(ds.images, images)
    assert torch.equal(ds.labels, labels)
    assert ds.classes == class_names(name, coarse) and len(ds) == len(labels)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["binary", "python"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_reader_matches_direct_parse(tmp_path, name, layout, split):
    root = write_dir(tmp_path / "d", layout_files(name, layout))
    load = load_cifar10 if name == "cifar10" else load_cifar100
    assert_dataset(load(root, split), name, split)


def test_cifar100_coarse_labels(tmp_path):
    for layout in ("binary", "python"):
        root = write_dir(tmp_path / layout, layout_files("cifar100", layout))
        assert_dataset(load_cifar100(root, "train", labels="coarse"), "cifar100", "train", coarse=True)


def test_python3_pickles_read_too(tmp_path):
    """Files re-saved by Python 3 / numpy 2 (bytes via _codecs.encode, numpy._core) load the same."""
    a = load_cifar10(write_dir(tmp_path / "py2", layout_files("cifar10", "python", py2=True)))
    b = load_cifar10(write_dir(tmp_path / "py3", layout_files("cifar10", "python", py2=False)))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes


@pytest.mark.parametrize("layout,sub", [("binary", "cifar-10-batches-bin"), ("python", "cifar-10-batches-py")])
def test_official_subfolder_and_archive_equal_directory(tmp_path, layout, sub):
    files = layout_files("cifar10", layout)
    direct = load_cifar10(write_dir(tmp_path / "flat", files))
    nested = load_cifar10(write_dir(tmp_path / "nested" / sub, files).parent)
    archive = write_tar(tmp_path / f"cifar-10-{layout}.tar.gz", files, prefix=sub)
    from_tar = load_cifar10(archive)
    in_dir = tmp_path / "has_archive"
    in_dir.mkdir()
    archive.rename(in_dir / f"cifar-10-{layout}.tar.gz")  # the official archive name inside --data DIR
    for ds in (nested, from_tar, load_cifar10(in_dir)):
        assert torch.equal(ds.images, direct.images) and torch.equal(ds.labels, direct.labels)
        assert ds.classes == direct.classes


def test_binary_preferred_when_both_layouts_present(tmp_path):
    root = write_dir(tmp_path / "both", layout_files("cifar10", "binary"))
    write_dir(root, layout_files("cifar10", "python", seed=1))  # different pixels, must be ignored
    assert_dataset(load_cifar10(root, "test"), "cifar10", "test")


def test_load_dataset_dispatches(tmp_path, monkeypatch):
    root = write_dir(tmp_path / "d", layout_files("cifar10", "binary"))
    assert_dataset(load_dataset("cifar10", root, "test"), "cifar10", "test")
    monkeypatch.setenv("VITLAB_DATA", str(root))
    assert_dataset(load_dataset("CIFAR-10", None, "train"), "cifar10", "train")
    with pytest.raises(VitlabError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", root)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("VITLAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None, "cifar100") == tmp_path / "xdg" / "vitlab" / "cifar100"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "vitlab" / "cifar10"


# ---------------------------------------------------------------- safety and errors


class RunsShell:
    """Unpickling this would run a shell command (what a tampered dataset file could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["batch", "meta"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, where):
    marker = tmp_path / "pwned"
    files = layout_files("cifar10", "python")
    evil = {"data": RunsShell(marker), "labels": [0]} if where == "batch" else {"label_names": RunsShell(marker)}
    files["data_batch_1" if where == "batch" else "batches.meta"] = pickle.dumps(evil, protocol=2)
    root = write_dir(tmp_path / "d", files)
    target = "data_batch_1" if where == "batch" else "batches.meta"
    with pytest.raises(VitlabError, match=rf"{target}.*refusing to load (posix|nt)\.system"):
        load_cifar10(root)
    assert not marker.exists()
    # Sanity check that the payload is real: the unrestricted unpickler does run it.
    pickle.loads(pickle.dumps(RunsShell(marker)))
    assert marker.exists()


def test_unsafe_archive_member_is_refused(tmp_path):
    files = layout_files("cifar10", "binary")
    files["../../escape.bin"] = b"x"
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", files, prefix="")
    with pytest.raises(VitlabError, match=r"unsafe member path '\.\./\.\./escape\.bin'"):
        load_cifar10(archive)
    assert not (tmp_path.parent / "escape.bin").exists()


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    with pytest.raises(VitlabError) as err:
        load_cifar10(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "VITLAB_DATA" in msg and str(tmp_path / "nowhere") in msg and "CIFAR-10" in msg


@pytest.mark.parametrize(
    "layout,file,corrupt,message",
    [
        ("binary", "data_batch_4.bin", lambda b: b[:-100], r"data_batch_4\.bin: \d+ bytes is not a whole number"),
        ("binary", "test_batch.bin", lambda b: b"\x0a" + b[1:], r"test_batch\.bin: label 10 of record 0"),
        ("binary", "test_batch.bin", lambda b: b"", r"test_batch\.bin: 0 bytes"),
        ("binary", "batches.meta.txt", lambda b: b"a\nb\n", r"batches\.meta\.txt: expected 10 class names, got 2"),
        ("python", "data_batch_1", lambda b: b[: len(b) // 2], r"data_batch_1: not a readable CIFAR python file"),
        ("python", "test_batch", lambda b: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 12]}),
         r"test_batch: label 12 of record 1 is outside 0\.\.9"),  # pickle protocol 5 arrays load too
        ("python", "test_batch", lambda b: pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [3, 2]}),
         r"test_batch: 'data' is not a uint8 \(N, 3072\) array"),
        ("python", "test_batch", lambda b: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3]}),
         r"test_batch: 'labels' is missing or does not have one label per image"),
        ("python", "test_batch", lambda b: pickle.dumps([1, 2]), r"test_batch: expected a pickled dict, got list"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, layout, file, corrupt, message):
    files = layout_files("cifar10", layout)
    files[file] = corrupt(files[file])
    root = write_dir(tmp_path / "d", files)
    split = "test" if file.startswith("test") else "train"
    with pytest.raises(VitlabError, match=message) as err:
        load_cifar10(root, split)
    assert "\n" not in str(err.value) and str(root / file) in str(err.value)


def test_missing_meta_and_bad_split(tmp_path):
    files = layout_files("cifar10", "binary")
    del files["batches.meta.txt"]
    root = write_dir(tmp_path / "d", files)
    with pytest.raises(VitlabError, match=r"cannot read .*batches\.meta\.txt"):
        load_cifar10(root)
    with pytest.raises(VitlabError, match="splits train and test, not 'val'"):
        load_cifar10(root, "val")


def test_archive_without_the_files(tmp_path):
    archive = write_tar(tmp_path / "other.tar.gz", {"readme.txt": b"hi"}, prefix="x")
    with pytest.raises(VitlabError, match=r"other\.tar\.gz: no CIFAR-10 train files"):
        load_cifar10(archive)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(VitlabError, match=r"junk\.tar\.gz: not a readable tar archive"):
        load_cifar10(tmp_path / "junk.tar.gz")


# ---------------------------------------------------------------- download (no network needed)


def fake_server(monkeypatch, payload: bytes | None):
    """Make urlopen serve `payload`, or fail like a machine without network when None."""

    def urlopen(url, timeout=None):
        assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
        if payload is None:
            raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        response = io.BytesIO(payload)
        response.headers = {"Content-Length": str(len(payload))}
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_download_without_network_is_one_clear_line(tmp_path, monkeypatch):
    fake_server(monkeypatch, None)
    with pytest.raises(VitlabError) as err:
        load_cifar10(tmp_path / "cache", download=True)
    msg = str(err.value)
    assert "\n" not in msg and "VITLAB_DATA" in msg and str(tmp_path / "cache") in msg
    assert "cifar-10-binary.tar.gz" in msg and "name resolution" in msg
    assert not any((tmp_path / "cache").iterdir())  # no partial file left behind


def test_download_checks_md5_then_unpacks(tmp_path, monkeypatch):
    payload = write_tar(tmp_path / "a.tar.gz", layout_files("cifar10", "binary"), "cifar-10-batches-bin").read_bytes()
    fake_server(monkeypatch, payload)
    with pytest.raises(VitlabError, match=r"download of .* is corrupt \(MD5 [0-9a-f]{32}, expected c32a1d4a"):
        load_cifar10(tmp_path / "cache", download=True)  # the real MD5 cannot match our tiny archive
    assert not any((tmp_path / "cache").iterdir())

    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, archives={"binary": ("cifar-10-binary.tar.gz", md5)}))
    assert_dataset(load_cifar10(tmp_path / "cache", "test", download=True), "cifar10", "test")
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == sorted(
        ["cifar-10-batches-bin", "batches.meta.txt", "test_batch.bin", *(f"data_batch_{i}.bin" for i in range(1, 6))]
    )  # unpacked, archive removed: later loads read plain files
    fake_server(monkeypatch, None)  # no network needed any more
    assert_dataset(load_cifar10(tmp_path / "cache", "train", download=True), "cifar10", "train")


# ---------------------------------------------------------------- the real CIFAR-10 (skipped without VITLAB_DATA)


@pytest.fixture(scope="module")
def real(cifar_dir):
    """Both splits read once from VITLAB_DATA (the `cifar_dir` fixture skips when it is not set)."""
    return {"root": cifar_dir, **{split: load_cifar10(cifar_dir, split) for split in ("train", "test")}}


def test_real_counts_and_classes(real):
    assert real["train"].images.shape == (50000, 3, 32, 32) and real["test"].images.shape == (10000, 3, 32, 32)
    assert real["train"].labels.bincount().tolist() == [5000] * 10
    assert real["test"].labels.bincount().tolist() == [1000] * 10
    assert real["train"].classes == list(CIFAR10_CLASSES) == real["test"].classes


@pytest.mark.parametrize("file,offset", [("data_batch_1.bin", 0), ("data_batch_5.bin", 40000), ("test_batch.bin", 0)])
@pytest.mark.parametrize("record", [0, 9999])
def test_real_records_equal_raw_bytes(real, file, offset, record):
    with open(real["root"] / file, "rb") as f:
        f.seek(record * 3073)
        raw = np.frombuffer(f.read(3073), dtype=np.uint8)
    ds = real["test" if file.startswith("test") else "train"]
    assert int(ds.labels[offset + record]) == raw[0]
    assert torch.equal(ds.images[offset + record], torch.from_numpy(raw[1:].reshape(3, 32, 32).copy()))


@pytest.mark.parametrize(
    "split,filename,pixels",
    [
        ("train", "frog/leptodactylus_pentadactylus_s_000004.png", [[59, 62, 63], [43, 46, 45], [50, 48, 43]]),
        ("train", "truck/camion_s_000148.png", [[154, 177, 187], [126, 137, 136]]),
        ("test", "cat/domestic_cat_s_000907.png", [[158, 112, 49], [159, 111, 47], [165, 116, 51]]),
    ],
)
def test_real_known_images(real, split, filename, pixels):
    """The README's known images: found by their first pixels, at the index its filename list gives."""
    lines = (real["root"] / f"{split}_filenames.txt").read_text().splitlines()
    file, index, label, _ = next(line.split("\t") for line in lines if line.endswith("\t" + filename))
    position = int(index) + (10000 * (int(file[len("data_batch_")]) - 1) if split == "train" else 0)
    ds = real[split]
    assert ds.classes[int(label)] == filename.split("/")[0] == ds.classes[int(ds.labels[position])]
    first = torch.tensor(pixels, dtype=torch.uint8).T  # (3, k): RGB of the first k pixels of row 0
    hits = (ds.images[:, :, 0, : first.shape[1]] == first).flatten(1).all(1).nonzero().flatten().tolist()
    assert hits == [position]
    if filename.startswith("frog/lepto"):
        row1 = torch.tensor([[16, 20, 20], [0, 0, 0], [18, 8, 0]], dtype=torch.uint8).T
        assert torch.equal(ds.images[position, :, 1, :3], row1)


def test_real_labels_match_filename_lists_and_mean(real):
    for split in ("train", "test"):
        lines = (real["root"] / f"{split}_filenames.txt").read_text().splitlines()
        assert torch.equal(real[split].labels, torch.tensor([int(line.split("\t")[2]) for line in lines]))
    mean = real["train"].images.sum(dim=(0, 2, 3), dtype=torch.int64) / (50000 * 1024 * 255)
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN, dtype=mean.dtype), atol=1e-4)
