"""Image folders too big for memory: uint8 batches decoded by DataLoader workers, sharded over ranks, resumable.

`StreamLoader(root, "train", image_size=64, batch_size=256)` reads `root/<class>/*.jpg` (or `root/train/...`,
the layout `load_image_folder` reads, with the same class discovery) and yields (images (B, 3, S, S) uint8,
labels (B,) int64) batches, so the same batched on-device augmentation (`BatchAugment`) runs after it as after
the in-memory datasets.

- Order: every epoch's permutation is torch's DistributedSampler draw (seed + epoch) and each rank takes its
  strided shard (`vitlab.data.shard.shard_permutation`). Global batch k of an epoch is then the block
  k*B*W .. (k+1)*B*W of the permutation whatever the world size W, so a run resumed on another number of
  processes at the same global batch B*W sees exactly the examples it had not seen.
- Crops: training takes a random-resized crop (torchvision's RandomResizedCrop draw, scale/ratio as timm)
  from a generator seeded by (seed, epoch, file index): a pure function of the example, not of the worker
  that decodes it, so resuming mid-epoch gives the same pixels. Evaluation resizes the shorter side and
  centre-crops exactly as `load_image_folder` does, so stream and memory evaluation see the same pixels.
- Resume: `state_dict()` is (epoch, position in batches); after `load_state_dict` iteration yields exactly
  the batches that were left.
- Unreadable files never stop a run: in training the example is replaced by the next readable file (batches
  keep their size, so every rank takes the same number of steps), in evaluation it is dropped; either way
  it is counted in `skipped` (and named in `skipped_files`) for the loop to log.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vitlab.data.folder import decode_image, list_image_folder, open_rgb
from vitlab.data.shard import get_rank, get_world_size, shard, shard_permutation
from vitlab.errors import VitlabError

DATA_MODES = ("auto", "memory", "stream")
DECODERS = ("pil", "torchvision")
MEMORY_SHARE = 0.5  # auto mode holds a decoded dataset in memory when it takes at most this share of free RAM
MAX_REPLACEMENTS = 64  # training: readable files tried in place of an unreadable one before giving up on it
_JPEG = (".jpg", ".jpeg")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, VitlabError)


# ---- memory or stream --------------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_data_mode(mode: str, *, num_images: int, image_size: int, memory_share: float = MEMORY_SHARE,
                     available: int | None = None) -> str:
    """"memory" or "stream" for --data-mode `mode`; "auto" streams when the decoded uint8 set
    (num_images x 3 x S x S bytes) would take more than `memory_share` of the available memory."""
    if mode not in DATA_MODES:
        raise VitlabError(f"data mode must be one of {', '.join(DATA_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    if not 0 < memory_share <= 1:
        raise VitlabError(f"memory share must be in (0, 1], got {memory_share}")
    need = num_images * 3 * image_size * image_size
    return "memory" if need <= memory_share * (available_memory() if available is None else available) else "stream"


# ---- the folder ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderListing:
    """The image files of one split of an image folder, their labels and the class names (from train/)."""

    top: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]


def scan_folder(root: str | Path, split: str | None = "train", *, allow_empty_classes: bool = False) -> FolderListing:
    """List `split` of an image folder without decoding anything (same rules as `load_image_folder`)."""
    return FolderListing(*list_image_folder(root, split, allow_empty_classes=allow_empty_classes))


# ---- decoding -----------------------------------------------------------------------------------------------
def random_resized_box(width: int, height: int, rng: np.random.Generator, *, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop: torchvision's RandomResizedCrop.get_params with a numpy generator.

    Area a uniform share of the image in `scale`, aspect ratio log-uniform in `ratio`; after 10 misses, the
    central crop with the ratio clamped to `ratio`.
    """
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _train_crop_pil(path: Path, size: int, rng: np.random.Generator, scale, ratio) -> torch.Tensor:
    im = open_rgb(path, size)
    left, top, w, h = random_resized_box(*im.size, rng, scale=scale, ratio=ratio)
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # (3, S, S)


def _train_crop_torchvision(path: Path, size: int, rng: np.random.Generator, scale, ratio) -> torch.Tensor:
    from torchvision.transforms.v2.functional import InterpolationMode, resized_crop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+ points to torchcodec
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        x = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)  # (3, H, W)
    left, top, w, h = random_resized_box(x.shape[2], x.shape[1], rng, scale=scale, ratio=ratio)
    return resized_crop(x, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)


def torchvision_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+ points to torchcodec
            import torchvision.io  # noqa: F401
    except Exception:  # not installed, or built against another torch
        return False
    return True


def resolve_decoder(decoder: str) -> str:
    """Check `decoder`. Pillow is the default: as fast as torchvision's decode_jpeg on small JPEGs here
    (benchmarks/stream_loader.py times both), it goes through `vitlab.images.open_image` (pixel limit, 16-bit
    scaling, EXIF), and torchvision deprecates its decoders from 0.29 on. "torchvision" decodes JPEGs with
    `decode_jpeg` (EXIF applied, no pixel limit); other files always go through Pillow."""
    if decoder not in DECODERS:
        raise VitlabError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if decoder == "torchvision" and not torchvision_available():
        raise VitlabError("decoder 'torchvision' needs torchvision (pip install torchvision)")
    return decoder


class FolderStream(Dataset):
    """Item (file index, epoch) -> (uint8 (3, S, S) or None, label, [errors]): one example, decoded in a worker."""

    def __init__(self, listing: FolderListing, *, image_size: int, train: bool, seed: int,
                 scale: tuple[float, float], ratio: tuple[float, float], decoder: str) -> None:
        self.files, self.labels = listing.files, listing.labels
        self.size, self.train, self.seed = image_size, train, seed
        self.scale, self.ratio, self.decoder = scale, ratio, decoder

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int, epoch: int) -> torch.Tensor:
        path = self.files[index]
        if not self.train:
            return torch.from_numpy(decode_image(path, self.size).copy()).permute(2, 0, 1)  # as load_image_folder
        rng = np.random.default_rng((self.seed, epoch, index))  # the example's crop, whoever decodes it
        crop = _train_crop_torchvision if self.decoder == "torchvision" and path.suffix.lower() in _JPEG \
            else _train_crop_pil
        return crop(path, self.size, rng, self.scale, self.ratio)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        errors = []
        tries = min(MAX_REPLACEMENTS, len(self.files)) if self.train else 1
        for k in range(tries):
            i = (index + k) % len(self.files)
            try:
                return self.decode(i, epoch).contiguous(), self.labels[i], errors
            except _DECODE_ERRORS as e:
                msg = str(e) if isinstance(e, VitlabError) else f"{type(e).__name__}: {e}"
                errors.append((str(self.files[i]), msg))
        return None, -1, errors


def _collate(samples) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    kept = [(x, y) for x, y, _ in samples if x is not None]
    errors = [e for _, _, errs in samples for e in errs]
    if not kept:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), errors
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.int64), errors


class EpochBatches(Sampler):
    """This rank's batches of one epoch as lists of (file index, epoch), from batch `start` on.

    Training: the epoch's DistributedSampler shard, cut into full batches (a partial last one is dropped, so
    every rank takes the same number of steps). Evaluation: files in order, each on exactly one rank.
    """

    def __init__(self, n: int, *, batch_size: int, train: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.train = n, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def indices(self) -> torch.Tensor:
        if self.train:
            return shard_permutation(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                     world_size=self.world_size)
        return shard(torch.arange(self.n), rank=self.rank, world_size=self.world_size, mode="exact")

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size) if self.train else len(range(self.rank, self.n, self.world_size))
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self.indices().tolist()
        B = self.batch_size
        for k in range(self.start, len(self)):
            yield [(i, self.epoch) for i in idx[k * B:(k + 1) * B]]


class StreamLoader:
    """Batches of (uint8 images (B, 3, S, S), int64 labels (B,)) streamed from an image folder.

    `for images, labels in loader:` runs the rest of the current epoch, then moves to the next one;
    `state_dict()` / `load_state_dict()` carry (epoch, position) through a checkpoint. `train` defaults to
    split == "train". rank / world_size default to the process group's (one process: 0 / 1).
    """

    def __init__(self, root: str | Path, split: str | None = "train", *, image_size: int, batch_size: int,
                 train: bool | None = None, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 workers: int = 2, decoder: str = "pil", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), pin_memory: bool = False,
                 prefetch_factor: int = 2, allow_empty_classes: bool = False) -> None:
        if image_size < 1 or batch_size < 1 or workers < 0:
            raise VitlabError("image_size and batch_size must be >= 1 and workers >= 0")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise VitlabError(f"crop scale {scale} must lie in (0, 1] and ratio {ratio} be positive, low <= high")
        self.listing = scan_folder(root, split, allow_empty_classes=allow_empty_classes)
        self.train = split == "train" if train is None else train
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.batch_size, self.seed, self.image_size = batch_size, seed, image_size
        self.decoder = resolve_decoder(decoder)
        self.dataset = FolderStream(self.listing, image_size=image_size, train=self.train, seed=seed,
                                    scale=scale, ratio=ratio, decoder=self.decoder)
        self.sampler = EpochBatches(len(self.dataset), batch_size=batch_size, train=self.train, seed=seed,
                                    rank=self.rank, world_size=self.world_size)
        if self.train and len(self.sampler) == 0:
            raise VitlabError(f"{len(self.dataset)} images under {self.listing.top} make no full batch of "
                              f"{batch_size} per rank on {self.world_size} rank(s); lower --batch-size")
        # generator: the workers' base seed is drawn from it at every epoch, not from the global torch RNG,
        # whose dropout stream a resumed run must find where the checkpoint left it
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=_collate, pin_memory=pin_memory, persistent_workers=workers > 0,
                                 prefetch_factor=prefetch_factor if workers else None,
                                 generator=torch.Generator().manual_seed(seed))
        self.epoch, self.position = 0, 0
        self.skipped = 0  # unreadable files met so far (each time one is met)
        self.skipped_files: dict[str, str] = {}  # path -> error, each file once

    # ---- what the loop plans with ----------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.listing.classes

    @property
    def num_classes(self) -> int:
        return len(self.listing.classes)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    # ---- iteration and its state -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch on the next iteration."""
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = self.epoch, self.position
        for images, labels, errors in self.loader:
            for path, msg in errors:
                self.skipped += 1
                self.skipped_files.setdefault(path, msg)
            self.position += 1
            yield images, labels
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_images": self.num_images,
                "global_batch_size": self.global_batch_size, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; any world size works if the global batch size is the same."""
        for key, mine in (("num_images", self.num_images), ("global_batch_size", self.global_batch_size),
                          ("seed", self.seed)):
            if int(state[key]) != mine:
                raise VitlabError(f"cannot resume the data stream: the checkpoint's {key.replace('_', ' ')} is "
                                  f"{state[key]}, this run's {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = int(state.get("skipped", 0))
