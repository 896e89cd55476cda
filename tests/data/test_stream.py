"""Streaming image folders: DistributedSampler order and shards, exact mid-epoch resume (also on another world
size at the same global batch), evaluation pixels equal to load_image_folder's, unreadable files counted.

Every image has a flat red channel that encodes the file's index, so any crop of it names the file and a batch
can be checked example by example against the order it should have; green and blue are ramps, so different
crops of one file have different pixels.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from vitlab.data import AugmentConfig, BatchAugment, load_image_folder
from vitlab.data import stream as S
from vitlab.errors import VitlabError
from vitlab.train.distributed import shard_permutation

CLASSES = ("cat", "dog", "fox")
PER_CLASS = 8  # 24 training images
SIZE = 16


def _red(index: int) -> int:
    return 10 + 8 * index


def _write(path, size, red, fmt):
    """A (w, h) image: red flat at `red`, green a horizontal and blue a vertical ramp."""
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[..., 0] = red
    pixels[..., 1] = np.linspace(0, 255, w)[None]
    pixels[..., 2] = np.linspace(0, 255, h)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    sizes = [(40, 30), (24, 64), (33, 33), (100, 20)]  # landscape, portrait, square, very wide
    for split, n in (("train", PER_CLASS), ("val", 3)):
        i = 0
        for name in CLASSES:
            for k in range(n):
                fmt = "JPEG" if k % 3 == 0 else "PNG"
                ext = ".jpg" if fmt == "JPEG" else ".png"
                _write(root / split / name / f"{k:02d}{ext}", sizes[(i + k) % 4], _red(i), fmt)
                i += 1
    return root


def _ids(images: torch.Tensor) -> list[int]:
    """File index of each image, from its red level (JPEG may move it by a level or two)."""
    red = images[:, 0].float().mean(dim=(1, 2))
    return [int(round((r.item() - 10) / 8)) for r in red]


def _loader(root, **kw):
    kw = {"image_size": SIZE, "batch_size": 4, "seed": 3, "workers": 0, "decoder": "pil", **kw}
    return S.StreamLoader(root, "train", **kw)


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ---- order and shards ----------------------------------------------------------------------------------------
def test_batches_follow_distributed_sampler_order(folder):
    loader = _loader(folder)
    listing = loader.listing
    assert loader.classes == list(CLASSES) and loader.num_images == 3 * PER_CLASS and len(loader) == 6
    for epoch in range(2):
        ref = DistributedSampler(range(loader.num_images), num_replicas=1, rank=0, shuffle=True, seed=3)
        ref.set_epoch(epoch)
        want = list(ref)
        batches = _epoch(loader)
        got = [i for x, _ in batches for i in _ids(x)]
        assert got == want
        for x, y in batches:
            assert x.dtype == torch.uint8 and x.shape == (4, 3, SIZE, SIZE) and y.dtype == torch.int64
        assert [int(v) for _, y in batches for v in y] == [listing.labels[i] for i in want]
    assert loader.epoch == 2 and loader.position == 0 and loader.skipped == 0


def test_ranks_get_disjoint_shards_and_global_batches_do_not_depend_on_world_size(folder):
    one = _epoch(_loader(folder, batch_size=8))
    ranks = [_epoch(_loader(folder, rank=r, world_size=2)) for r in range(2)]
    seen = [i for r in ranks for x, _ in r for i in _ids(x)]
    assert sorted(seen) == list(range(24))  # disjoint and complete
    for r, batches in enumerate(ranks):
        want = shard_permutation(24, seed=3, epoch=0, rank=r, world_size=2).tolist()
        assert [i for x, _ in batches for i in _ids(x)] == want
    for k, (x, _) in enumerate(one):  # global batch k: the same examples, with the same crops
        both = torch.cat([ranks[0][k][0], ranks[1][k][0]])
        assert sorted(_ids(both)) == sorted(_ids(x))
        order = np.argsort(_ids(both)), np.argsort(_ids(x))
        assert torch.equal(both[order[0]], x[order[1]])


def test_crops_are_random_and_change_with_the_epoch(tmp_path):
    g = np.linspace(0, 255, 128).astype(np.uint8)  # a horizontal gradient: each crop has its own pixels
    for c in CLASSES:
        (tmp_path / c).mkdir()
        Image.fromarray(np.stack([np.tile(g, (96, 1))] * 3, -1)).save(tmp_path / c / "g.png")
    loader = _loader(tmp_path, batch_size=3)
    e0, e1 = torch.cat([x for x, _ in _epoch(loader)]), torch.cat([x for x, _ in _epoch(loader)])
    assert e0.shape == (3, 3, SIZE, SIZE) and len({c.float().mean().item() for c in e0}) == 3
    assert not torch.equal(e0, e1)


# ---- resume --------------------------------------------------------------------------------------------------
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(folder):
    full = _loader(folder)
    uninterrupted = _epoch(full) + _epoch(full)  # epochs 0 and 1

    first = _loader(folder, workers=2)  # workers decode; the crops must not depend on which one
    seen = _epoch(first)  # all of epoch 0, then two batches of epoch 1
    it = iter(first)
    seen += [next(it), next(it)]
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)

    again = _loader(folder)
    again.load_state_dict(state)
    rest = _epoch(again)
    assert len(seen) + len(rest) == len(uninterrupted)
    for (x, y), (x2, y2) in zip([*seen, *rest], uninterrupted):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert (again.epoch, again.position) == (2, 0)


def test_resume_on_another_world_size_at_the_same_global_batch(folder):
    one = _loader(folder, batch_size=8)
    uninterrupted = _epoch(one)
    one.set_epoch(0)
    it = iter(one)
    next(it)
    state = one.state_dict()
    halves = []
    for r in range(2):
        loader = _loader(folder, rank=r, world_size=2)
        loader.load_state_dict(state)
        halves.append(_epoch(loader))
    assert len(halves[0]) == len(uninterrupted) - 1
    for k, (x, _) in enumerate(uninterrupted[1:]):
        assert sorted(_ids(torch.cat([halves[0][k][0], halves[1][k][0]]))) == sorted(_ids(x))
    with pytest.raises(VitlabError, match="global batch size is 8, this run's 4"):
        _loader(folder).load_state_dict(state)


# ---- evaluation ----------------------------------------------------------------------------------------------
def test_eval_pixels_equal_load_image_folder(folder, tmp_path):
    ref = load_image_folder(folder, "val", size=SIZE, cache_dir=tmp_path)
    loader = S.StreamLoader(folder, "val", image_size=SIZE, batch_size=4, workers=0)
    assert not loader.train and loader.classes == ref.classes
    batches = _epoch(loader)
    assert [len(y) for _, y in batches] == [4, 4, 1]  # the last, partial batch is kept
    assert torch.equal(torch.cat([x for x, _ in batches]), ref.images)
    assert torch.equal(torch.cat([y for _, y in batches]), ref.labels)
    shards = [torch.cat([y for _, y in _epoch(S.StreamLoader(folder, "val", image_size=SIZE, batch_size=2,
                                                             workers=0, rank=r, world_size=2))]) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(ref.labels.tolist())  # each image on one rank, once


# ---- unreadable files ----------------------------------------------------------------------------------------
def test_unreadable_files_are_counted_never_fatal(folder, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    (root / "train" / "dog" / "zz_junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    png = (root / "train" / "fox" / "01.png").read_bytes()
    (root / "train" / "fox" / "zz_cut.png").write_bytes(png[: len(png) // 2])
    (root / "val" / "cat" / "zz_junk.png").write_bytes(b"garbage")

    loader = _loader(root, workers=2, batch_size=13)
    batches = _epoch(loader)
    assert [len(y) for _, y in batches] == [13, 13]  # 26 files: full batches, bad ones replaced
    assert loader.skipped == 2 and sorted(p.rsplit("/", 1)[1] for p in loader.skipped_files) == \
        ["zz_cut.png", "zz_junk.jpg"]
    ev = S.StreamLoader(root, "val", image_size=SIZE, batch_size=4, workers=0)
    assert sum(len(y) for _, y in _epoch(ev)) == 9 and ev.skipped == 1


# ---- pieces --------------------------------------------------------------------------------------------------
def test_random_resized_box_is_torchvisions_draw():
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    for W, H in ((64, 48), (20, 200), (500, 375)):
        for _ in range(200):
            left, top, w, h = S.random_resized_box(W, H, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            assert 0 <= left and left + w <= W and 0 <= top and top + h <= H and w > 0 and h > 0
    # when every try misses, both fall back to the same central crop
    img = torch.zeros(3, 30, 90)
    for ratio in ((0.5, 0.5), (5.0, 6.0), (1.0, 2.0)):
        i, j, h, w = tv.RandomResizedCrop.get_params(img, scale=(1.0, 1.0), ratio=list(ratio))
        assert S.random_resized_box(90, 30, rng, scale=(1.0, 1.0), ratio=ratio) == (j, i, w, h)


def test_random_resized_box_matches_torchvision_in_distribution():
    tv = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    rng, img, n = np.random.default_rng(0), torch.zeros(1, 48, 64), 3000
    ours = np.array([S.random_resized_box(64, 48, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(n)])
    theirs = np.array([tv.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    area_ours, area_theirs = ours[:, 2] * ours[:, 3] / (64 * 48), theirs[:, 2] * theirs[:, 3] / (64 * 48)
    assert abs(area_ours.mean() - area_theirs.mean()) < 0.02  # 4 standard errors of the mean area
    assert abs(np.median(ours[:, 2] / ours[:, 3]) - np.median(theirs[:, 3] / theirs[:, 2])) < 0.05


def test_torchvision_and_pillow_decoders_agree(tmp_path):
    if not S.torchvision_available():
        pytest.skip("torchvision is not installed")
    g = np.linspace(0, 255, 96)
    pixels = np.stack([np.add.outer(g[:72] / 2, g / 2), np.tile(g, (72, 1)), np.full((72, 96), 128)], -1)
    for c in CLASSES:
        (tmp_path / c).mkdir()
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / c / "a.jpg", quality=95)
    a = torch.cat([x for x, _ in _epoch(_loader(tmp_path, batch_size=3, decoder="pil"))]).float()
    b = torch.cat([x for x, _ in _epoch(_loader(tmp_path, batch_size=3, decoder="torchvision"))]).float()
    assert (a - b).abs().mean() < 2.0  # the same crops; the two bicubic kernels differ by about a level


def test_batches_feed_batch_augment(folder):
    x, y = next(iter(_loader(folder)))
    out, targets = BatchAugment(AugmentConfig(), num_classes=3)(x, y, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, SIZE, SIZE) and out.dtype == torch.float32 and targets.shape == (4, 3)


def test_choose_data_mode_and_bad_input(folder):
    n, s = 1000, 64  # 12.3 MB decoded
    assert S.choose_data_mode("auto", num_images=n, image_size=s, available=100_000_000) == "memory"
    assert S.choose_data_mode("auto", num_images=n, image_size=s, available=20_000_000) == "stream"
    assert S.choose_data_mode("auto", num_images=n, image_size=s, available=20_000_000, memory_share=1.0) == "memory"
    assert S.choose_data_mode("stream", num_images=1, image_size=1) == "stream"
    assert S.available_memory() > 0
    with pytest.raises(VitlabError, match="data mode must be one of"):
        S.choose_data_mode("disk", num_images=1, image_size=1)
    with pytest.raises(VitlabError, match="make no full batch of 64"):
        _loader(folder, batch_size=64)
    with pytest.raises(VitlabError, match="decoder must be one of"):
        _loader(folder, decoder="magic")
