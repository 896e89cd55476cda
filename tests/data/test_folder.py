"""Image folders: class discovery, RGB conversion, resize + centre crop, skipped files, the decode cache."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import folder, load_dataset, load_image_folder
from vitlab.errors import VitlabError


def save(path, array: np.ndarray, mode: str | None = None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kw)
    return path


def solid(rgb, size=(32, 32)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (*size, 3)).copy()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_classes_labels_and_rgb_conversion(tmp_path, cache):
    root = tmp_path / "imgs"
    save(root / "cat" / "rgb.png", solid((10, 200, 30)))
    save(root / "cat" / "nested" / "photo.JPG", solid((250, 0, 0)), quality=100)
    save(root / "dog" / "gray.png", np.full((32, 32), 100, np.uint8), "L")
    rgba = np.concatenate([solid((10, 20, 30)), np.full((32, 32, 1), 128, np.uint8)], -1)
    save(root / "dog" / "alpha.png", rgba, "RGBA")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 70, 80, 90] + [0] * 762)
    palette.info["transparency"] = 0  # palette PNGs with transparency take the RGBA route
    (root / "eel").mkdir()
    palette.save(root / "eel" / "palette.png")
    (root / "eel" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.png", solid((1, 1, 1)))

    ds = load_image_folder(root, cache_dir=cache)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]  # sorted paths within each class: nested/photo.JPG < rgb.png
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 3, 32, 32) and ds.images.is_contiguous()
    centre = ds.images[:, :, 16, 16].tolist()
    assert abs(centre[0][0] - 250) <= 2 and centre[0][1] <= 2 and centre[0][2] <= 2  # JPEG is lossy
    assert centre[1:] == [[10, 200, 30], [10, 20, 30], [100, 100, 100], [70, 80, 90]]


def test_resize_shorter_side_then_centre_crop(tmp_path, cache):
    rng = np.random.default_rng(0)
    blocks = np.repeat(np.repeat(rng.integers(0, 256, (6, 12, 3), dtype=np.uint8), 8, 0), 8, 1)  # (48, 96, 3)
    save(tmp_path / "imgs" / "a" / "wide.png", blocks)
    ds = load_image_folder(tmp_path / "imgs", size=16, cache_dir=cache)
    reference = Image.fromarray(blocks).resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16))
    assert ds.images.shape == (1, 3, 16, 16)
    assert torch.equal(ds.images[0], torch.from_numpy(np.array(reference)).permute(2, 0, 1))


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, cache):
    root = tmp_path / "imgs"
    save(root / "a" / "good.png", solid((5, 6, 7)))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = (root / "a" / "good.png").read_bytes()
    (root / "b").mkdir()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    save(root / "b" / "ok.bmp", solid((9, 9, 9)))
    for attempt in ("decoded", "cached"):  # the cached result still reports what was skipped
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = load_image_folder(root, cache_dir=cache)
        assert len(caught) == 1, attempt
        msg = str(caught[0].message)
        assert "skipped 2 unreadable image file(s)" in msg and "broken.png" in msg
        assert ds.labels.tolist() == [0, 1] and ds.images[:, :, 0, 0].tolist() == [[5, 6, 7], [9, 9, 9]]


def test_second_load_comes_from_cache_and_changes_invalidate_it(tmp_path, cache, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(3):
        save(root / f"c{i}" / "x.png", solid((i * 50, 10, 20)))
    first = load_image_folder(root, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1

    def no_decoding(path, size):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folder, "decode_image", no_decoding)
    second = load_image_folder(root, cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes

    path = root / "c1" / "x.png"
    save(path, solid((1, 2, 3)))
    os.utime(path, ns=(1, 1))  # a changed file (new mtime/size) must not be served from the old cache
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_folder(root, cache_dir=cache)
    monkeypatch.undo()
    assert load_image_folder(root, cache_dir=cache).images[1, :, 0, 0].tolist() == [1, 2, 3]


def test_split_folders_share_the_training_classes(tmp_path, cache):
    root = tmp_path / "imgs"
    for cls in ("ant", "bee", "cow"):
        save(root / "train" / cls / "1.png", solid((1, 1, 1)))
    save(root / "val" / "cow" / "1.png", solid((2, 2, 2)))
    train = load_dataset("folder", root, "train", image_size=8, cache_dir=cache)
    test = load_dataset("folder", root, "test", image_size=8, cache_dir=cache)  # falls back to val/
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    assert train.labels.tolist() == [0, 1, 2] and test.labels.tolist() == [2]
    assert test.images.shape == (1, 3, 8, 8)
    save(root / "val" / "dog" / "1.png", solid((2, 2, 2)))
    with pytest.raises(VitlabError, match=r"val/dog: class folder not in the training classes"):
        load_image_folder(root, "val", cache_dir=cache)


def test_folder_errors(tmp_path, cache):
    with pytest.raises(VitlabError, match="does not exist"):
        load_image_folder(tmp_path / "missing", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitlabError, match="no class folders in"):
        load_image_folder(tmp_path / "empty", cache_dir=cache)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(VitlabError, match=r"no images \(.png"):
        load_image_folder(tmp_path / "empty", cache_dir=cache)
    save(tmp_path / "flat" / "a" / "1.png", solid((0, 0, 0)))
    assert len(load_image_folder(tmp_path / "flat", "train", cache_dir=cache)) == 1  # no split dirs: all train
    with pytest.raises(VitlabError, match="has no test or val folder"):
        load_image_folder(tmp_path / "flat", "test", cache_dir=cache)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(VitlabError, match=r"no readable images under .*bad: 1 unreadable, e.g. .*x\.png"):
        load_image_folder(tmp_path / "bad", cache_dir=cache)


def test_an_empty_training_class_folder_is_an_error_or_a_named_warning(tmp_path, cache):
    save(tmp_path / "d" / "train" / "cat" / "0.png", solid((255, 0, 0)))
    save(tmp_path / "d" / "test" / "cat" / "0.png", solid((255, 0, 0)))
    (tmp_path / "d" / "train" / "zebra" / "sub").mkdir(parents=True)  # folders, but no image anywhere under it
    with pytest.raises(VitlabError, match=f"{tmp_path / 'd' / 'train' / 'zebra'}.*--allow-empty-classes"):
        load_image_folder(tmp_path / "d", "train", cache_dir=cache)
    with pytest.warns(UserWarning, match="zebra"):
        ds = load_image_folder(tmp_path / "d", "train", cache_dir=cache, allow_empty_classes=True)
    assert ds.classes == ["cat", "zebra"] and ds.labels.tolist() == [0]
    test = load_image_folder(tmp_path / "d", "test", cache_dir=cache)  # no zebra images to test on: no error there
    assert test.classes == ["cat", "zebra"]
