"""`vitlab eval RUN_DIR [--data DIR]`: top-1, top-5 and per-class accuracy of a run's weights.

Evaluates on the test split of the dataset the run was trained on, normalised as its
preprocessor_config.json says. Writes RUN_DIR/eval.json and RUN_DIR/confusion.png.
"""

from __future__ import annotations

import argparse
import sys

from vitlab.train.tta import TTA_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained run: top-1/5, per-class accuracy, confusion matrix",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by `vitlab train` (or a vitlab, Hugging Face or timm "
                                   "model directory)")
    p.add_argument("--data", help="dataset directory (default: the run's, else $VITLAB_DATA, else the cache)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--tta", nargs="?", const="flip-translate", default="none", choices=TTA_MODES,
                   help="test-time augmentation: average over flipped (and shifted) views; --tta alone: flip-translate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.rundir import EVAL_NAME
    from vitlab.train.evaluate import evaluate_run

    notes: list[str] = []
    res = evaluate_run(args.run_dir, data=args.data, split=args.split, batch_size=args.batch_size,
                       device=args.device, progress=not args.no_progress, tta=args.tta, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    tta = f", TTA {args.tta}; {res['top1_without_tta']:.2%} without" if args.tta != "none" else ""
    print(f"{res['dataset']} {res['split']} ({res['count']} images{tta}): top-1 {res['top1']:.2%}  "
          f"top-5 {res['top5']:.2%}  loss {res['loss']:.4f}")
    width = max(len(c) for c in res["per_class"])
    for name, acc in res["per_class"].items():
        print(f"  {name:<{width}}  {acc:7.2%}")
    print(f"wrote {args.run_dir}/{EVAL_NAME}" + (f" and {res['confusion_png']}" if res["confusion_png"] else
                                                  " (no confusion.png: matplotlib is not installed)"))
    return 0
