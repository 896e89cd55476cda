"""Swin's windows as vitlab.inspect draws them, against timm's own block (which patch lands in which window, the
mask), hand-worked cases (a 4x4 grid with 2x2 windows shifted by 1, distances), the model's attention, and the
explain CLI, demo panels and TensorBoard image on a tiny saved Swin."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import check_report, write_images
from vitlab.cli import main
from vitlab.inspect.images import model_inputs
from vitlab.inspect.windows import (
    PAD,
    centre_patch,
    default_block,
    feature_pca_images,
    locate_patch,
    uniform_window_distance,
    window_attention_distance,
    window_attention_map,
    window_edges,
    window_ids,
    window_mask,
    window_members,
    window_pieces,
    wrapped_windows,
)
from vitlab.model import create_model
from vitlab.model.swin import window_partition

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CASES = [((16, 16), 4, 2), ((8, 8), 4, 0), ((4, 4), 2, 1), ((6, 6), 4, 2), ((12, 8), 4, 2), ((7, 7), 7, 0)]
IDS = ["16-w4-s2", "8-w4", "4-w2-s1", "6-w4-s2-padded", "12x8-w4-s2", "7-w7"]


def timm_swin():
    return pytest.importorskip("timm.models.swin_transformer", reason="timm is not installed (vitlab[dev])")


def timm_block(grid, window, shift):
    """timm's Swin block for one stage grid: its windows and mask are the reference."""
    return timm_swin().SwinTransformerBlock(dim=4, input_resolution=grid, num_heads=1, window_size=window,
                                            shift_size=shift).eval()


def timm_windows(grid, window, shift) -> torch.Tensor:
    """(nW, N): the patch index timm's block puts in each window slot, read from the windows its attention receives
    (norm1 removed, so the tokens carry their index + 1; the block's zero padding reads -1)."""
    blk = timm_block(grid, window, shift)
    blk.norm1 = torch.nn.Identity()
    seen = []
    blk.attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    H, W = grid
    x = (torch.arange(H * W, dtype=torch.float32) + 1).view(1, H, W, 1).expand(1, H, W, 4)
    with torch.no_grad():
        blk(x)
    return seen[0][..., 0].round().long() - 1


@pytest.mark.parametrize("grid, window, shift", CASES, ids=IDS)
def test_window_members_are_the_windows_timm_attends_in(grid, window, shift):
    got = window_members(grid, window, shift)
    torch.testing.assert_close(got, timm_windows(grid, window, shift), rtol=0, atol=0)
    H, W = grid
    rolled = torch.roll(torch.arange(H * W).view(1, H, W, 1), shifts=(-shift, -shift), dims=(1, 2))
    if H % window == 0 and W % window == 0:  # the model's partition of the rolled index grid: the same windows
        torch.testing.assert_close(got, window_partition(rolled, window).reshape(-1, window * window), rtol=0, atol=0)
        timm_windows_ = timm_swin().window_partition(rolled, (window, window)).reshape(-1, window * window)
        torch.testing.assert_close(got, timm_windows_, rtol=0, atol=0)
    real = got[got != PAD]
    assert sorted(real.tolist()) == list(range(H * W))  # every patch in exactly one window
    ids = window_ids(grid, window, shift)
    for w in range(len(got)):  # window_ids is the inverse of the membership
        assert set((ids.flatten() == w).nonzero().flatten().tolist()) == set(got[w][got[w] != PAD].tolist())


@pytest.mark.parametrize("grid, window, shift", [c for c in CASES if c[2]], ids=[i for i, c in zip(IDS, CASES) if c[2]])
def test_mask_is_timms_mask(grid, window, shift):
    """Allowed pairs are exactly those timm's block leaves at 0 (it adds -100 to the others)."""
    timm_mask = timm_block(grid, window, shift).attn_mask  # (nW, N, N)
    torch.testing.assert_close(window_mask(grid, window, shift), timm_mask == 0, rtol=0, atol=0)


def test_shift_by_one_on_a_4x4_grid_by_hand():
    """2x2 windows shifted by 1: window 1 (0-based 0) is the centre block, the others join patches across the edges."""
    members = window_members((4, 4), 2, 1)
    assert members.tolist() == [[5, 6, 9, 10], [7, 4, 11, 8], [13, 14, 1, 2], [15, 12, 3, 0]]
    assert window_ids((4, 4), 2, 1).tolist() == [[3, 2, 2, 3], [1, 0, 0, 1], [1, 0, 0, 1], [3, 2, 2, 3]]
    assert wrapped_windows((4, 4), 2, 1) == [1, 2, 3]
    assert window_mask((4, 4), 2, 1)[3].sum().item() == 4  # four pieces of one patch each: only the diagonal
    pieces = {(w, r, c) for w, _, r, c in window_pieces((4, 4), 2, 1)}
    assert (0, 2.0, 2.0) in pieces and {(3, 0.5, 0.5), (3, 3.5, 3.5), (3, 0.5, 3.5), (3, 3.5, 0.5)} <= pieces
    rolled = {(w, r, c) for w, _, r, c in window_pieces((4, 4), 2, 1, rolled=True) if w == 3}
    assert rolled == {(3, 2.5, 2.5), (3, 2.5, 3.5), (3, 3.5, 2.5), (3, 3.5, 3.5)}  # together after the roll
    assert locate_patch((4, 4), 2, 1, (0, 0)) == (3, 3) and locate_patch((4, 4), 2, 1, (1, 2)) == (0, 1)
    assert len(window_edges(window_ids((4, 4), 2, 0))) == 8  # two full lines of 4 patch edges each


def one_block(grid, window, shift, stage=0):
    return [{"stage": stage, "block": 0, "grid": grid, "window": window, "shift": shift, "heads": 1}]


def test_attention_distance_by_hand():
    # uniform over a 2x2 window: each query is 0, 1, 1 and sqrt(2) patches from the keys
    uniform = torch.full((1, 4, 1, 4, 4), 0.25)
    want = 3 * (2 + math.sqrt(2)) / 4
    [d] = window_attention_distance([uniform], one_block((4, 4), 2, 0), patch_size=3)
    assert d.item() == pytest.approx(want, rel=1e-6)
    assert uniform_window_distance(2, 3) == pytest.approx(want, rel=1e-6)
    [d1] = window_attention_distance([uniform], one_block((4, 4), 2, 0, stage=1), patch_size=3)
    assert d1.item() == pytest.approx(2 * want, rel=1e-6)  # a stage-1 patch is two input patches wide
    eye = torch.eye(4).expand(2, 4, 3, 4, 4)  # every query attends to itself only
    assert window_attention_distance([eye], one_block((4, 4), 2, 0), patch_size=3)[0].tolist() == [0.0] * 3
    # shifted by 1, attention uniform where timm's mask allows it: the centre window as above, two windows of two
    # pairs 1 patch apart (0.5 per query) and a window of four single patches (0): (6 + sqrt 2) / 16 per query
    masked = timm_block((4, 4), 2, 1).attn_mask.softmax(dim=-1)[None, :, None]  # (1, nW, 1, N, N)
    [d] = window_attention_distance([masked], one_block((4, 4), 2, 1), patch_size=1)
    assert d.item() == pytest.approx((6 + math.sqrt(2)) / 16, rel=1e-5)


def test_padding_slots_count_neither_as_queries_nor_keys():
    layout = one_block((6, 6), 4, 0)  # padded to 8x8: 4 windows, 28 of their 64 slots padding
    members = window_members((6, 6), 4, 0)
    keep = (members != PAD).float()
    attn = (keep[:, None, :] / keep.sum(1)[:, None, None]).expand(4, 16, 16)[None, :, None]  # uniform over real keys
    [d] = window_attention_distance([attn], layout, patch_size=1)
    pos = torch.stack([members // 6, members % 6], -1).float()
    want = [torch.cdist(pos[w][keep[w] > 0], pos[w][keep[w] > 0]).mean() * (keep[w].sum()) for w in range(4)]
    assert d.item() == pytest.approx(float(sum(want) / keep.sum()), rel=1e-5)


@pytest.fixture(scope="module")
def swin():
    """A tiny Swin with a shifted block in both stages (16x16 then 8x8 patches, 4x4 windows)."""
    return create_model("swin-test", num_classes=10, depths=(2, 2), seed=0).eval()


def test_real_model_attention_respects_the_windows(swin):
    layout = swin.block_layout()
    assert [(b["stage"], b["shift"]) for b in layout] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, attns = swin.forward_attention(x)
    for a, blk in zip(attns, layout):
        allowed = window_mask(blk["grid"], blk["window"], blk["shift"])  # (nW, N, N)
        assert a.shape == (2, len(allowed), blk["heads"], 16, 16)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
        assert (a * ~allowed[None, :, None]).max().item() < 1e-30  # masked pairs: exp(-100) of the rest
    # the map of the centre window in stage 1's shifted block: patch (8, 8) sits at (6, 6) of the grid rolled by 2,
    # i.e. slot 10 of window 5; key (r, c) sits at slot ((r - 2) % 4) * 4 + (c - 2) % 4
    m = window_attention_map(attns[1][0], (16, 16), 4, 2, patch=centre_patch((16, 16)))  # (1, 16, 16)
    inside = ~m[0].isnan()
    assert inside.nonzero().tolist() == [[r, c] for r in range(6, 10) for c in range(6, 10)]
    for r in range(6, 10):
        for c in range(6, 10):
            assert m[0, r, c].item() == pytest.approx(attns[1][0, 5, 0, 10, ((r - 2) % 4) * 4 + (c - 2) % 4].item())
    mean = window_attention_map(attns[1][0], (16, 16), 4, 2, patch=(8, 8), mean_query=True)
    assert mean[0][inside].sum().item() == pytest.approx(1.0, abs=1e-5)
    d = window_attention_distance(attns, layout, patch_size=swin.cfg.patch_size)
    assert [len(v) for v in d] == [1, 1, 2, 2]
    for v, blk in zip(d, layout):  # never beyond the window's diagonal
        reach = math.hypot(3, 3) * swin.cfg.patch_size * 2 ** blk["stage"]
        assert (v > 0).all() and (v < reach).all()
    assert default_block(layout, 0) == 1 and default_block(layout, 1) == 3


def test_feature_pca_colours_follow_the_main_direction():
    t = torch.arange(6.0)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    maps = (t[:, None] * v + 0.01 * torch.randn(6, 5, generator=torch.Generator().manual_seed(0))).T.reshape(1, 5, 2, 3)
    rgb = feature_pca_images(maps)
    assert rgb.shape == (1, 2, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[0, ..., 0].flatten()
    assert torch.allclose(red, t / 5, atol=0.02) or torch.allclose(red, 1 - t / 5, atol=0.02)


# ---------------------------------------------------------------- explain, demo, TensorBoard on a saved Swin


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def make_swin_run(path, **overrides):
    model = create_model("swin-test", num_classes=10, seed=0, **overrides)
    model.save_pretrained(path, class_names=CLASSES)
    with open(path / "metrics.jsonl", "w") as f:
        for e in range(1, 3):
            f.write(json.dumps({"epoch": e, "train_loss": 2.3 / e, "test_loss": 2.4 / e, "test_top1": 0.1 * e,
                                "lr": 1e-3}) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.49, 0.48, 0.45], "image_std": [0.25, 0.24, 0.26], "rescale_factor": 1 / 255,
         "size": {"height": 32, "width": 32}}))
    return path


SWIN_PNGS = {"windows.png", "window_attention.png", "attention_distance.png", "stage_features.png",
             "patch_filters.png", "embeddings.png", "training_curves.png", "confusion_matrix.png"}


@pytest.mark.parametrize("overrides", [{}, dict(depths=(2, 2))], ids=["swin-test", "shifted-blocks"])
def test_explain_a_swin_run(matplotlib, tmp_path, capsys, overrides):
    run = make_swin_run(tmp_path / "run", **overrides)
    out = tmp_path / "out"
    assert main(["explain", str(run), *write_images(tmp_path / "cat", 3), "--out", str(out), "--show", "2"]) == 0
    page = check_report(out, SWIN_PNGS)
    assert "wrote 8 figures" in capsys.readouterr().out
    assert "Windows and shifted windows" in page and "Attention inside one window" in page
    assert "ViT-only views are left out" in page and "accuracy on these images" in page
    assert "rollout" not in page.split("<h2>", 1)[1].lower()  # no rollout section
    shifted = "depths" in overrides
    assert ("single block" in page) != shifted  # swin-test's stages have one block: its shift is only drawn
    with Image.open(out / "windows.png") as im, Image.open(out / "window_attention.png") as att:
        assert im.size[0] > 2.5 * im.size[1]  # the four panels side by side
        assert att.size[1] > 2 * 150  # two image rows


def test_explain_swin_on_test_images(matplotlib, tmp_path, tiny_cifar):
    data = tiny_cifar(tmp_path / "cifar", test=12)
    run = make_swin_run(tmp_path / "run", depths=(2, 1))
    assert main(["explain", str(run), "--test-images", "12", "--data", str(data), "--batch-size", "5"]) == 0
    page = check_report(run / "explain", SWIN_PNGS)
    assert "first 12 CIFAR-10 test images" in page


def test_explain_numbers_are_the_library_functions(tmp_path):
    from vitlab.inspect.explain import Inputs
    from vitlab.inspect.explain_swin import analyse_swin
    from vitlab.inspect.rundir import load_run

    run = load_run(make_swin_run(tmp_path / "run", depths=(2, 2)))
    images = (torch.rand(5, 3, 32, 32) * 255).to(torch.uint8)
    an = analyse_swin(run, Inputs(images, torch.full((5,), -1), "random"), show=2, batch_size=2)
    x = model_inputs(run.preprocess, images)
    with torch.no_grad():
        logits, attns = run.model.forward_attention(x)
        maps = run.model.forward_intermediates(x, intermediates_only=True)
    want = window_attention_distance(attns, run.model.block_layout(), patch_size=2)
    for got, w in zip(an.distance, want):
        torch.testing.assert_close(got, w)
    torch.testing.assert_close(an.preds, logits.argmax(-1))
    assert [a.shape[0] for a in an.attns] == [2] * 4 and [f.shape for f in an.features] == [m[:2].shape for m in maps]


def swin_explorer(run):
    """The demo's Explorer on a Swin dir, opened as the model-dir opener does (any registry family: kind 'swin')."""
    from vitlab.demo.explorer import Explorer
    from vitlab.model import load_pretrained
    from vitlab.preprocess import HALF, ImagePreprocess

    pre = ImagePreprocess(size=32, resize="square", crop_size=None, mean=HALF, std=HALF, backend="pil")
    src = SimpleNamespace(path=run, kind="swin", model=load_pretrained(run), preprocess=pre, class_names=CLASSES,
                          tokenizer=None)
    return Explorer(src)


def test_demo_panels_for_a_swin(matplotlib, tmp_path):
    from vitlab.demo.explorer import PATCH, WINDOW_MEAN

    ex = swin_explorer(make_swin_run(tmp_path / "run", depths=(2, 2)))
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image)
    view = ex.analyse(image)
    assert view.rollout is None and len(view.attns) == 4 and ex.is_classifier and ex.position_figure() is None
    side = 32 * ex.scale
    both = ex.windows_image(view, 1)
    assert both.size == (2 * side + 16, side) and both.mode == "RGB"  # regular | shifted
    clicked = ex.patch_at(side // 2 + 1, side // 2 + 1)  # display pixel -> input patch (8, 8)
    assert clicked == 8 * 16 + 8
    with torch.no_grad():
        _, attns = ex.tower.forward_attention(view.x)
    row = ex.window_attention(view, 1, 0, PATCH, clicked)
    assert row[8, 9].item() == pytest.approx(attns[1][0, 5, 0, 10, 11].item())  # key (8, 9): slot (2, 3)
    for block in range(4):
        img = ex.window_attention_image(view, block, None, WINDOW_MEAN, None)
        assert img.size == (side, side) and img.mode == "RGB"
    img = np.asarray(ex.window_attention_image(view, 1, 0, PATCH, clicked), np.float32)
    base = np.asarray(ex._base(view), np.float32)
    assert np.allclose(img[2, 2], base[2, 2] * 0.35, atol=1)  # outside the window: dimmed
    top = 6 * 2 * ex.scale  # the window's outline, on the top edge of stage-0 patch row 6
    assert any(tuple(img[y, 8 * 2 * ex.scale]) == (255, 221, 0) for y in (top - 1, top, top + 1))
    from vitlab.demo.app import build_app

    build_app(ex)  # the page builds with the Swin panels


def test_tensorboard_logs_window_attention_for_a_swin(matplotlib, swin):
    from vitlab.train.tensorboard import RolloutProbe

    images = (torch.rand(3, 3, 32, 32) * 255).to(torch.uint8)
    probe = RolloutProbe(images, torch.tensor([0, 1, 2]), CLASSES, mean=(0.5,) * 3, std=(0.5,) * 3)
    fig = probe.figure(swin, step=7)
    assert fig.get_suptitle().startswith("step 7: Stage 1, block 2 (shifted windows")
    img = probe.image(swin, step=7)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
