"""Batched augmentation: exact crop/flip, per-sample policy ops, mixup/cutmix targets, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.data import AugmentConfig, BatchAugment, apply_policy, mix_batch, normalize, smooth_one_hot
from vitlab.data import policy as P
from vitlab.errors import VitlabError

PLAIN = dict(crop_padding=0, flip=False, policy="none", mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = input / 255, one-hot targets


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(B: int = 32, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    images = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (B,), generator=g)


def run(images, labels, seed=0, num_classes=10, **overrides):
    return BatchAugment(AugmentConfig(**{**PLAIN, **overrides}), num_classes=num_classes)(images, labels, gen(seed))


def test_shapes_dtypes_ranges_and_targets():
    images, labels = batch()
    x, t = BatchAugment(AugmentConfig(), num_classes=10)(images, labels, gen())  # the default full recipe
    assert x.shape == images.shape and x.dtype == torch.float32 and t.shape == (32, 10) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(32)) and t.min() >= 0 and t.max() <= 1
    for policy in ("trivial", "randaug"):
        x, _ = run(images, labels, crop_padding=4, flip=True, policy=policy, mixup_alpha=0.8, cutmix_alpha=1.0)
        assert x.min() >= 0 and x.max() <= 1  # mean 0, std 1: the [0, 1] working range
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, _ = run(images, labels, mean=mean, std=std)
    ref = (images / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    aug = BatchAugment(AugmentConfig(mean=mean, std=std), num_classes=10)
    assert torch.allclose(aug.eval_transform(images), ref, atol=1e-5)
    assert torch.allclose(normalize(images / 255, mean, std), ref, atol=1e-5)  # float input in [0, 1]


def test_float_input_equals_uint8_input():
    images, labels = batch()
    cfg = dict(crop_padding=4, flip=True, policy="trivial", mixup_alpha=0.8, cutmix_alpha=1.0)
    a, ta = run(images, labels, seed=3, **cfg)
    b, tb = run(images.float() / 255, labels, seed=3, **cfg)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(ta, tb)


def test_flip_is_an_exact_mirror():
    images, labels = batch(64)
    x, _ = run(images, labels, flip=True)
    out = (x * 255).round().to(torch.uint8)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 16 < mirrored.sum() < 48  # about half flipped, each sample decided on its own


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_windows_come_from_the_padded_image(mode):
    images, labels = batch(48, size=12)
    x, _ = run(images, labels, crop_padding=3, padding_mode=mode)
    out = (x * 255).round().to(torch.uint8)
    padded = F.pad(images, (3, 3, 3, 3), mode="constant" if mode == "zeros" else "reflect")
    offsets = set()
    for i in range(len(images)):
        windows = [(dy, dx) for dy in range(7) for dx in range(7)]
        hits = [(dy, dx) for dy, dx in windows if torch.equal(out[i], padded[i, :, dy : dy + 12, dx : dx + 12])]
        assert len(hits) >= 1, f"sample {i} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 10  # different samples get different crops


def test_same_seed_same_output_different_seed_different_output():
    images, labels = batch()
    cfg = dict(crop_padding=4, flip=True, policy="randaug", mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    a, ta = run(images, labels, seed=7, **cfg)
    b, tb = run(images, labels, seed=7, **cfg)
    c, tc = run(images, labels, seed=8, **cfg)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["trivial", "randaug"])
def test_policy_gives_each_sample_its_own_op(policy):
    one = batch(1)[0].float() / 255
    x = one.expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = apply_policy(x, policy, generator=gen())
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) > 20  # one op for the whole batch would give 1
    assert torch.equal(x, one.expand(64, -1, -1, -1))  # input untouched


def test_grouped_ops_equal_one_by_one():
    """Sorting by op and running each op on its slice equals applying each sample's op on its own."""
    x = batch(40, size=16)[0].float() / 255
    g = gen(1)
    op = torch.randint(len(P.OPS), (40,), generator=g)
    value = torch.rand(40, generator=g) - 0.5
    value[op == P.OPS.index("posterize")] *= 8
    value[op == P.OPS.index("rotate")] *= 90
    out = P.apply_ops(x, op, value)
    for i in range(40):
        name = P.OPS[int(op[i])]
        xi, vi = x[i : i + 1], value[i : i + 1]
        ref = xi if name == "identity" else P.affine(xi, op[i : i + 1], vi) if name in P.OPS[P.FIRST_GEOMETRIC :] \
            else P.COLOR_OPS[name](xi, vi)
        assert torch.allclose(out[i], ref[0], atol=1e-6), name


def test_ops_match_torchvision():
    """Colour ops agree with torchvision's functional ops; geometric ones with its bilinear affine/rotate."""
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    x8 = batch(6, size=16)[0]
    x = x8.float() / 255
    v = torch.full((6,), 0.6)
    exact_uint8 = {
        "equalize": (P.equalize(x, v), TF.equalize(x8)),
        "posterize": (P.posterize(x, torch.full((6,), 5.0)), TF.posterize(x8, 3)),
        "solarize": (P.solarize(x, torch.full((6,), 0.5)), TF.solarize(x8, 127.5)),
    }
    for name, (mine, ref) in exact_uint8.items():
        assert torch.equal((mine * 255).round().to(torch.uint8), ref), name
    close_float = {
        "autocontrast": (P.autocontrast(x, v), TF.autocontrast(x)),
        "brightness": (P.brightness(x, v), TF.adjust_brightness(x, 1.6)),
        "color": (P.color(x, -v), TF.adjust_saturation(x, 0.4)),
        "contrast": (P.contrast(x, v), TF.adjust_contrast(x, 1.6)),
        "sharpness": (P.sharpness(x, v), TF.adjust_sharpness(x, 1.6)),
    }
    for name, (mine, ref) in close_float.items():
        assert (mine - ref).abs().max() < 0.02, name
    bilinear = dict(interpolation=InterpolationMode.BILINEAR)
    shear = math.degrees(math.atan(0.3))
    geometric = {
        "rotate": (30.0, TF.rotate(x, 30.0, **bilinear)),
        "translate_x": (0.25, TF.affine(x, angle=0.0, translate=[4, 0], scale=1.0, shear=[0.0, 0.0], **bilinear)),
        "translate_y": (-0.25, TF.affine(x, angle=0.0, translate=[0, -4], scale=1.0, shear=[0.0, 0.0], **bilinear)),
        "shear_x": (0.3, TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], **bilinear)),
        "shear_y": (0.3, TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear], **bilinear)),
    }
    for name, (value, ref) in geometric.items():
        mine = P.affine(x, torch.full((6,), P.OPS.index(name)), torch.full((6,), value))
        assert (mine - ref).abs().max() < 1e-4, name


def test_label_smoothing_targets():
    labels = torch.tensor([3, 0, 9])
    t = smooth_one_hot(labels, 10, 0.1)
    assert torch.allclose(t[torch.arange(3), labels], torch.full((3,), 0.9 + 0.01))
    assert torch.allclose(t.sum(1), torch.ones(3)) and torch.isclose(t[0, 4], torch.tensor(0.01))
    images, _ = batch(3)
    _, t2 = run(images, labels, label_smoothing=0.1)
    assert torch.equal(t, t2)
    _, t3 = run(images, labels, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    assert torch.equal(t3, F.one_hot(labels, 10).float())


def constant_images(B: int, size: int = 16) -> torch.Tensor:
    """Sample i is filled with the value i / B, so every output pixel tells which sample it came from."""
    return (torch.arange(B, dtype=torch.float32) / B).view(B, 1, 1, 1).expand(B, 3, size, size).contiguous()


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_targets_match_the_pasted_area(seed):
    B, K = 8, 12
    x, labels = constant_images(B), torch.randperm(K, generator=gen(seed))[:B]
    targets = smooth_one_hot(labels, K)
    mixed, t = mix_batch(x, targets, generator=gen(seed), cutmix_alpha=1.0)
    assert torch.allclose(t.sum(1), torch.ones(B)) and t.min() >= 0 and t.max() <= 1
    own = (mixed == x).all(1).float().mean(dim=(1, 2))  # fraction of each image that is still its own
    partner = (mixed == x.flip(0)).all(1).float().mean(dim=(1, 2))
    for i in range(B):
        if i != B - 1 - i:
            assert torch.isclose(t[i, labels[i]], own[i]) and torch.isclose(t[i, labels[B - 1 - i]], partner[i])
    assert own[0] < 1  # a box was pasted (lambda = 1 exactly has probability 0)
    assert torch.equal(x, constant_images(B))  # input untouched


def test_mixup_targets_match_the_blend():
    B, K = 8, 12
    x, labels = constant_images(B), torch.arange(B)
    mixed, t = mix_batch(x, smooth_one_hot(labels, K), generator=gen(5), mixup_alpha=0.4)
    lam = t[0, 0]
    assert 0 < lam < 1 and torch.allclose(t.sum(1), torch.ones(B))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(t[torch.arange(B), labels.flip(0)], 1 - lam)


def test_mixup_or_cutmix_chosen_per_batch():
    x, labels = constant_images(8), torch.arange(8)
    kinds = set()
    for seed in range(20):
        mixed, _ = mix_batch(x, smooth_one_hot(labels, 8), generator=gen(seed), mixup_alpha=1.0, cutmix_alpha=1.0)
        kinds.add("cutmix" if ((mixed == x) | (mixed == x.flip(0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_cpu_threads_are_restored_and_do_not_change_results():
    images, labels = batch()
    cfg = AugmentConfig(policy="trivial")
    before = torch.get_num_threads()
    a, ta = BatchAugment(cfg, num_classes=10, cpu_threads=1)(images, labels, gen(2))
    assert torch.get_num_threads() == before
    b, tb = BatchAugment(cfg, num_classes=10, cpu_threads=None)(images, labels, gen(2))
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(ta, tb)


def test_config_is_validated():
    for bad in (dict(policy="autoaugment"), dict(padding_mode="edge"), dict(mix_prob=1.5), dict(randaug_m=31),
                dict(label_smoothing=1.0), dict(std=(1.0, 0.0, 1.0)), dict(mixup_alpha=-1.0)):
        with pytest.raises(VitlabError):
            AugmentConfig(**bad)
