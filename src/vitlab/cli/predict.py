"""`vitlab predict RUN_DIR IMAGE... [--top-k 5]`: top-k labels with probabilities for image files.

Images of any size and mode (RGB, RGBA, L, P, CMYK, ...) are converted to RGB, resized to the model's
size (bicubic), rescaled and normalised exactly as the run's preprocessor_config.json says (without one:
mean = std = 0.5, with a note). A DeiT model predicts with the mean of its class and distillation heads.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify image files with a trained run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by `vitlab train` (or a vitlab, Hugging Face or timm "
                                   "model directory, or a timm .safetensors file with its config.json)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.train.predict import predict

    notes: list[str] = []
    preds = predict(args.run_dir, args.images, top_k=args.top_k, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for pred in preds:
        if args.json:
            print(json.dumps({"image": pred.path, "labels": pred.labels, "probs": pred.probs}))
            continue
        print(pred.path)
        width = max(len(label) for label in pred.labels)
        for label, prob in zip(pred.labels, pred.probs):
            print(f"  {label:<{width}}  {prob:7.2%}")
    return 0
