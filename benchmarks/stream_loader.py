"""Images/s of the streaming image-folder loader (vitlab.data.stream) against the Ti/4 training step it must feed.

    python benchmarks/stream_loader.py [--data CIFAR_DIR] [--n 50000] [--workers 1 2] [--decoders pil torchvision]

Writes the real CIFAR-10 training images, upscaled to --file-size (64) with bicubic, as JPEGs
(root/train/<class>/NNNNN.jpg) into a folder outside the repo (--folder, default a temp dir; reused when
it already holds --n files), then times, per decoder and worker count:
- `loader`: batches/s of StreamLoader alone (random-resized crop to --image-size, uint8 batches), the first
  batch (worker start-up) excluded;
- `fed`: the Ti/4 training step (default precision) consuming the loader's batches, i.e. loader and
  training sharing the CPU, as in a real run; compared with `step`, the same step on one fixed batch.
The loader is not the bottleneck when `fed` is close to `step`. Results: benchmarks/results/stream_loader.json
and one RESULTS.md row (unless --no-results-md). `--n 600 --batches 3 --no-results-md` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import append_rows, table_row  # noqa: E402

from vitlab.data import load_cifar10, normalize  # noqa: E402
from vitlab.data.stream import StreamLoader, torchvision_available  # noqa: E402
from vitlab.model import create_model  # noqa: E402
from vitlab.speed import TrainStep, resolve_precision  # noqa: E402


def make_folder(folder: Path, *, data: str | None, n: int, file_size: int, quality: int) -> Path:
    """CIFAR-10 train images 0..n-1 as file_size x file_size JPEGs under folder/train/<class>/."""
    train = folder / "train"
    if train.is_dir() and sum(1 for _ in train.rglob("*.jpg")) == n:
        return folder
    ds = load_cifar10(data, "train")
    if n > len(ds):
        raise SystemExit(f"--n {n} is more than the {len(ds)} CIFAR-10 training images")
    for c in ds.classes:
        (train / c).mkdir(parents=True, exist_ok=True)
    pixels = ds.images[:n].permute(0, 2, 3, 1).numpy()  # (n, 32, 32, 3)
    for i in tqdm(range(n), desc=f"writing {n} JPEGs", unit="img"):
        im = Image.fromarray(pixels[i]).resize((file_size, file_size), Image.Resampling.BICUBIC)
        im.save(train / ds.classes[int(ds.labels[i])] / f"{i:05d}.jpg", quality=quality)
    return folder


def time_loader(loader: StreamLoader, batches: int, consume=None) -> float:
    """Images/s over `batches` batches after the first (worker start-up and first decode excluded)."""
    it = iter(loader)
    x, y = next(it)
    if consume:
        consume(x, y)
    seen, t = 0, time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        if consume:
            consume(x, y)
        seen += len(y)
    return seen / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 directory (default: $VITLAB_DATA)")
    p.add_argument("--folder", type=Path, default=None, help="where the JPEG folder is written (default: a temp dir)")
    p.add_argument("--n", type=int, default=50_000, help="JPEG files to write and stream from")
    p.add_argument("--file-size", type=int, default=64, help="side of the JPEG files (CIFAR upscaled)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--image-size", type=int, default=64, help="training crop size (the step is timed at it too)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--step-batches", type=int, default=8, help="timed batches in the fed / step measurements")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--decoders", nargs="+", default=["pil", "torchvision"], choices=["pil", "torchvision"])
    p.add_argument("--model", default="Ti/4")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="measurements per setting (median reported)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "stream_loader.json")
    p.add_argument("--no-results-md", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()

    decoders = [d for d in args.decoders if d == "pil" or torchvision_available()]
    tmp = None if args.folder else tempfile.TemporaryDirectory(prefix="vitlab-stream-bench-")
    folder = make_folder(args.folder or Path(tmp.name), data=args.data, n=args.n, file_size=args.file_size,
                         quality=args.quality)

    precision = resolve_precision(args.precision, device=torch.device("cpu"))
    model = create_model(args.model, image_size=args.image_size, num_classes=10, seed=0).train()
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-4), precision=precision)
    fixed = (torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8),
             torch.randint(0, 10, (args.batch_size,)))

    def consume(x, y):  # what a training step does with a loader batch (augmentation aside)
        step(normalize(x), y)[0].item()

    for _ in range(2):  # warm-up
        consume(*fixed)
    t = time.perf_counter()
    for _ in range(args.step_batches):
        consume(*fixed)
    step_rate = args.batch_size * args.step_batches / (time.perf_counter() - t)

    results = {}
    for decoder in decoders:
        for w in args.workers:
            def loader(w=w, decoder=decoder):
                return StreamLoader(folder, "train", image_size=args.image_size, batch_size=args.batch_size,
                                    workers=w, decoder=decoder, seed=0)
            alone = [time_loader(loader(), args.batches) for _ in range(args.repeats)]
            fed = [time_loader(loader(), args.step_batches, consume) for _ in range(args.repeats)]
            key = f"{decoder}-{w}w"
            results[key] = {"decoder": decoder, "workers": w, "loader_img_s": round(statistics.median(alone), 1),
                            "fed_step_img_s": round(statistics.median(fed), 1)}
            print(f"{key}: loader {results[key]['loader_img_s']} img/s, {args.model} step fed by it "
                  f"{results[key]['fed_step_img_s']} img/s (alone {step_rate:.1f})", flush=True)

    record = {"n_files": args.n, "file_size": args.file_size, "image_size": args.image_size,
              "batch_size": args.batch_size, "model": args.model, "precision": precision,
              "step_img_s": round(step_rate, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if not args.no_results_md:
        best = max(results.values(), key=lambda r: r["loader_img_s"])
        detail = "; ".join(f"{k}: loader {r['loader_img_s']:.0f}, fed step {r['fed_step_img_s']:.0f}"
                           for k, r in results.items())
        append_rows([table_row([
            "stream_loader", time.strftime("%Y-%m-%d"),
            f"{args.n} CIFAR-10 JPEGs {args.file_size}px -> crops {args.image_size}px, batch {args.batch_size}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            f"loader alone up to **{best['loader_img_s']:.0f} img/s** ({best['decoder']}, {best['workers']} "
            f"workers) vs {args.model} step {step_rate:.0f} img/s ({precision})",
            f"img/s, median of {args.repeats}: {detail}; results/{args.out.name}"])])
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
