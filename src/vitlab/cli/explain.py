"""`vitlab explain RUN_DIR [IMAGE ...] [--test-images N]`: figures + report.html of what a ViT (or Swin) learned."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from vitlab.errors import VitlabError

DEFAULT_TEST_IMAGES = 256


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="draw attention maps, rollout (Swin: windows), position/filter views and metrics of a run",
        description="Write PNG figures and one self-contained report.html that show what a trained ViT "
                    "attends to and what it learned (a Swin: its windows and shifted windows, one window's "
                    "attention, attention distance by stage, every stage's feature map). Without IMAGE paths it "
                    "explains the first "
                    f"--test-images (default {DEFAULT_TEST_IMAGES}) CIFAR-10 test images.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (config.json + model.safetensors)")
    p.add_argument("images", metavar="IMAGE", nargs="*", help="image files to explain (any format Pillow reads)")
    p.add_argument("--test-images", type=int, metavar="N", default=None,
                   help=f"explain the first N CIFAR-10 test images (default {DEFAULT_TEST_IMAGES} without IMAGE)")
    p.add_argument("--data", metavar="DIR", default=None, help="CIFAR-10 directory (default: $VITLAB_DATA)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/explain)")
    p.add_argument("--show", type=int, default=6, metavar="K", help="images drawn in the attention figures")
    p.add_argument("--batch-size", type=int, default=64, metavar="B")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.inspect.explain import explain_run

    if args.images and args.test_images is not None:
        raise VitlabError("give IMAGE paths or --test-images, not both")
    for name in ("show", "batch_size"):
        if getattr(args, name) < 1:
            raise VitlabError(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_images is not None and args.test_images < 1:
        raise VitlabError("--test-images must be at least 1")
    if importlib.util.find_spec("matplotlib") is None:
        raise VitlabError("vitlab explain draws with matplotlib, which is not installed: pip install 'vitlab[plot]'")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise VitlabError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError("--device cuda: no CUDA device is available here")
    from vitlab.inspect.rundir import load_run

    run_ = load_run(args.run_dir, device=device)
    inputs = _image_inputs(args.images, run_) if args.images else \
        _test_inputs(args.data, args.test_images or DEFAULT_TEST_IMAGES, run_)
    out = Path(args.out) if args.out else Path(args.run_dir) / "explain"
    result = explain_run(run_, inputs, out_dir=out, show=args.show, batch_size=args.batch_size)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(result.figures)} figures and {result.report}")
    return 0


def _image_inputs(paths: list[str], run_):
    """IMAGE files; a parent folder named like a class (image-folder layout) gives the true label."""
    from vitlab.inspect.explain import Inputs
    from vitlab.inspect.images import prepare_images

    index = {name: i for i, name in enumerate(run_.class_names)}
    images = prepare_images(run_.preprocess, paths)  # (B, 3, S, S) uint8
    labels = torch.tensor([index.get(Path(p).parent.name, -1) for p in paths], dtype=torch.int64)
    return Inputs(images, labels, f"{len(paths)} image file{'s' if len(paths) > 1 else ''}")


def _test_inputs(data: str | None, n: int, run_):
    from vitlab.data import load_cifar10, resolve_data_dir
    from vitlab.inspect.explain import Inputs
    from vitlab.inspect.images import prepare_images

    ds = load_cifar10(resolve_data_dir(data), split="test")
    num_classes = run_.model.cfg.num_classes
    if num_classes and num_classes != ds.num_classes:
        raise VitlabError(f"the model has {num_classes} classes but CIFAR-10 has {ds.num_classes}; "
                          "pass IMAGE paths instead")
    if not num_classes:  # no classifier (e.g. a CLIP image tower): CIFAR's names still label the images
        run_.class_names = list(ds.classes)
    images = prepare_images(run_.preprocess, ds.images[:n])  # (n, 3, S, S) uint8 at the model's size
    return Inputs(images, ds.labels[:n], f"first {len(images)} CIFAR-10 test images")
