"""TrivialAugment-Wide and RandAugment applied to a whole batch, with a different op and magnitude per sample.

torchvision's v2 transforms and kornia's auto-augment pick ONE op for the whole batch; looping over samples
is ~10x slower. Here every sample draws its own op, the batch is sorted by op so each op runs once on a
contiguous slice, and all geometric ops (rotate, shear, translate) share one `affine_grid` + `grid_sample`
call with per-sample matrices. Ops and magnitude ranges follow torchvision's `TrivialAugmentWide` and
`RandAugment` (31 magnitude bins); images are float (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError

OPS = (
    "identity", "autocontrast", "equalize", "posterize", "solarize",
    "brightness", "color", "contrast", "sharpness",
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",  # geometric ops stay last and adjacent
)
FIRST_GEOMETRIC = OPS.index("rotate")
NUM_BINS = 31  # magnitude levels 0..30, as torchvision
# Magnitude at the top level: TrivialAugment-Wide, RandAugment. Translations are fractions of the image size
# (torchvision: 32 px of a 32 px image, and 150/331 of it), posterize counts bits dropped (8 -> 2 or 4).
MAX_MAGNITUDE = {
    "posterize": (6.0, 4.0),
    "solarize": (1.0, 1.0),  # threshold goes from 1.0 (nothing inverted) down to 0.0
    "brightness": (0.99, 0.9), "color": (0.99, 0.9), "contrast": (0.99, 0.9), "sharpness": (0.99, 0.9),
    "rotate": (135.0, 30.0),  # degrees
    "shear_x": (0.99, 0.3), "shear_y": (0.99, 0.3),
    "translate_x": (1.0, 150 / 331), "translate_y": (1.0, 150 / 331),
}
SIGNED = ("brightness", "color", "contrast", "sharpness", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
POLICIES = ("none", "trivial", "randaug")


def apply_policy(
    x: torch.Tensor,
    policy: str,
    *,
    generator: torch.Generator,
    num_ops: int = 2,
    magnitude: int = 9,
) -> torch.Tensor:
    """Augment float images (B, 3, H, W) in [0, 1]; returns a new tensor, the input is left alone.

    "trivial": one op per sample, magnitude level uniform in 0..30 (TrivialAugment-Wide).
    "randaug": `num_ops` ops in sequence per sample, all at level `magnitude` (0..30), RandAugment.
    Random parameters come from `generator`, so a seed reproduces the batch exactly.
    """
    if policy == "none":
        return x
    if policy not in POLICIES:
        raise VitlabError(f"unknown augmentation policy {policy!r}; choose from {', '.join(POLICIES)}")
    wide = policy == "trivial"
    table = torch.tensor([MAX_MAGNITUDE.get(op, (0.0, 0.0))[0 if wide else 1] for op in OPS])
    signed = torch.tensor([op in SIGNED for op in OPS])
    B, dev = x.shape[0], generator.device
    for _ in range(1 if wide else num_ops):
        op = torch.randint(len(OPS), (B,), generator=generator, device=dev)
        if wide:
            level = torch.randint(NUM_BINS, (B,), generator=generator, device=dev) / (NUM_BINS - 1)
        else:
            level = torch.full((B,), magnitude / (NUM_BINS - 1), device=dev)
        flip_sign = torch.rand(B, generator=generator, device=dev) < 0.5
        value = level * table.to(dev)[op] * torch.where(signed.to(dev)[op] & flip_sign, -1.0, 1.0)
        x = apply_ops(x, op.to(x.device), value.to(x.device))
    return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Apply op `OPS[op[i]]` with signed magnitude `value[i]` to sample i of x (B, 3, H, W).

    Sorting by op makes each op's samples one contiguous slice: one host sync (the counts) for the batch.
    """
    order = op.argsort()
    xs, vs = x[order], value[order]  # (B, 3, H, W), (B,) grouped by op
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    start = 0
    for k, n in enumerate(counts[:FIRST_GEOMETRIC]):
        if n and OPS[k] != "identity":
            xs[start : start + n] = COLOR_OPS[OPS[k]](xs[start : start + n], vs[start : start + n])
        start += n
    if start < len(order):  # every geometric sample, in one resampling pass
        xs[start:] = affine(xs[start:], op[order[start:]], vs[start:])
    out = torch.empty_like(x)
    out[order] = xs
    return out


# ---------------------------------------------------------------- colour ops: x (G, 3, H, W), v (G,)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: factor 1 keeps x, 0 gives `other`, > 1 extrapolates away from it."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (G, 1, H, W), ITU-R 601 luma


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1 + v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), 1 + v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + v)


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13); the 1-pixel border is kept.

    The 3x3 box sum is built from shifted slices: several times faster on a CPU than a depthwise conv2d.
    """
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]  # (G, 3, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (G, 3, H-2, W-2) sum of each 3x3 neighbourhood
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1]) / 13
    return _blend(x, blurred, 1 + v)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keep the top 8 - round(v) bits of each 8-bit value."""
    step = (2.0 ** v.round()).view(-1, 1, 1, 1)
    return torch.floor((x * 255).round_() / step) * step / 255


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the threshold 1 - v."""
    return torch.where(x >= (1 - v).view(-1, 1, 1, 1), 1 - x, x)


def autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to span [0, 1]; constant channels are left as they are."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1 / (hi - lo).clamp_min(1e-6), 1.0)
    return ((x - torch.where(hi > lo, lo, 0.0)) * scale).clamp_(0, 1)


def equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel, the PIL `ImageOps.equalize` lookup table, vectorised."""
    G, C, H, W = x.shape
    q = (x * 255).round_().long().view(G * C, H * W)  # (G*C, HW) 8-bit values
    hist = torch.zeros(G * C, 256, device=x.device).scatter_add_(1, q, torch.ones(q.shape, device=x.device))
    last = hist.gather(1, q.amax(dim=1, keepdim=True))  # count of the largest value present
    step = torch.div(H * W - last, 255, rounding_mode="floor")  # (G*C, 1)
    before = hist.cumsum(dim=1) - hist  # pixels below each value
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    out = lut.clamp_(0, 255).gather(1, q) / 255
    return torch.where(step > 0, out, x.view(G * C, H * W)).view(G, C, H, W)


COLOR_OPS = {
    "autocontrast": autocontrast, "equalize": equalize, "posterize": posterize, "solarize": solarize,
    "brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness,
}


# ---------------------------------------------------------------- geometric ops, batched


def affine(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate each sample by its own amount; zeros fill what comes from outside.

    Builds one inverse matrix per sample (output pixel -> input pixel) in normalised coordinates and
    resamples bilinearly; `op` holds indices into OPS, `v` degrees, shear factors or fractions of the size.
    Matches torchvision's `F.rotate` / `F.affine` with bilinear interpolation, except that shear is about
    the image centre (torchvision's policies shear about the top-left corner, which at magnitude 0.99 pushes
    half of a small image out of the frame).
    """
    G, _, H, W = x.shape
    theta = torch.zeros(G, 2, 3, dtype=x.dtype, device=x.device)  # (G, 2, 3)
    name = {k: op == OPS.index(k) for k in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")}
    angle = torch.where(name["rotate"], v * (math.pi / 180), 0.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta[:, 0, 0] = cos
    theta[:, 1, 1] = cos
    # Normalised coordinates scale x by 2/W and y by 2/H, hence the H/W factors off the diagonal.
    theta[:, 0, 1] = (torch.where(name["shear_x"], v, 0.0) - sin) * (H / W)
    theta[:, 1, 0] = (torch.where(name["shear_y"], v, 0.0) + sin) * (W / H)
    theta[:, 0, 2] = torch.where(name["translate_x"], -2 * v, 0.0)  # content moves by +v * size
    theta[:, 1, 2] = torch.where(name["translate_y"], -2 * v, 0.0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (G, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
