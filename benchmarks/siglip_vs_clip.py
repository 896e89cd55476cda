"""SigLIP's sigmoid loss vs CLIP's softmax loss at batch sizes 64, 256, 1024, same CPU time for each run.

    python benchmarks/siglip_vs_clip.py [--budget MIN] [--batch-sizes 64,256,1024] [--eval-limit N]
                                        [--data DIR] [--out JSON] [--plot PNG] [--results-md MD]

Each (loss, batch size) run trains the same small towers from scratch on CIFAR-10 template captions
(`vitlab.clip.train`) for `--budget` minutes of training time, then measures zero-shot accuracy on the
first `--eval-limit` test images. Writes every run's summary and loss curve to JSON, a loss-curve figure,
and appends one row to benchmarks/RESULTS.md. Zhai et al. (2023) report that the sigmoid loss is better
than softmax at small batch sizes; with 10 classes, large batches are also full of false negatives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from results_md import append_rows

from vitlab.clip.train import ClipTrainConfig, train_clip
from vitlab.weights import write_json

HERE = Path(__file__).parent


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, loss in zip(axes, ("siglip", "clip")):
        for run in (r for r in runs if r["loss"] == loss):
            curve = run["loss_curve"]
            ax.plot([p["seconds"] for p in curve], [p["loss"] for p in curve], "o-", markersize=3,
                    label=f"batch {run['batch_size']} (zero-shot {100 * run['zero_shot_accuracy']:.1f}%)")
        ax.set_title(f"{'SigLIP (sigmoid)' if loss == 'siglip' else 'CLIP (softmax)'} training loss")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("loss")
        ax.legend()
    fig.suptitle("SigLIP vs CLIP on CIFAR-10 captions, same CPU time per run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.0, help="training minutes per run (default 2)")
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--eval-limit", type=int, default=2000, help="test images for zero-shot accuracy")
    ap.add_argument("--data", default=None, help="CIFAR-10 directory or archive (default: $VITLAB_DATA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "siglip_vs_clip.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "siglip_vs_clip.png"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="append a row here ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    runs = []
    for loss in ("siglip", "clip"):
        for bs in batch_sizes:
            cfg = ClipTrainConfig(loss=loss, batch_size=bs, time_budget=args.budget, test_subset=args.eval_limit)
            r = train_clip(cfg, data=args.data, device="cpu", progress=True)
            runs.append({"loss": loss, "batch_size": bs, **{k: v for k, v in r.items() if k != "config"}})
            print(f"{loss:6s} batch {bs:5d}: {r['steps']:4d} steps, {r['images_seen']:6d} images, "
                  f"final loss {r['final_loss']}, zero-shot {100 * r['zero_shot_accuracy']:.2f}%", flush=True)

    report = {"benchmark": "siglip_vs_clip", "date": datetime.date.today().isoformat(),
              "budget_min_per_run": args.budget, "eval_images": args.eval_limit, "threads": args.threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "model": {k: v for k, v in ClipTrainConfig().__dict__.items()
                        if k in ("width", "depth", "heads", "patch_size", "text_width", "text_depth", "lr")},
              "runs": runs}
    write_json(args.out, report)
    try:
        plot(runs, Path(args.plot))
    except ImportError:
        print("matplotlib not installed: no figure")
    if args.results_md:
        acc = {(r["loss"], r["batch_size"]): f"{100 * r['zero_shot_accuracy']:.1f}" for r in runs}
        sizes = "/".join(str(b) for b in batch_sizes)
        result = "; ".join(f"{name} {'/'.join(acc[(loss, b)] for b in batch_sizes)}%"
                           for loss, name in (("siglip", "SigLIP"), ("clip", "CLIP")))
        row = (f"| siglip_vs_clip | {report['date']} | CIFAR-10 captions, {args.budget} min CPU ({args.threads} "
               f"threads) per run, zero-shot on {args.eval_limit} test images | zero-shot acc. at batch {sizes}: "
               f"{result} | {Path(args.out).name} |")
        append_rows([row], Path(args.results_md))
    print(json.dumps({f"{r['loss']}@{r['batch_size']}": r["zero_shot_accuracy"] for r in runs}, indent=2))


if __name__ == "__main__":
    main()
