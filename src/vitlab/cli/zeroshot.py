"""`vitlab zeroshot MODEL_DIR --classes "cat,dog" IMAGE...`: classify images by class names alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlab.errors import VitlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot image classification with a CLIP/SigLIP model",
                       description="Rank class names for each image with a CLIP or SigLIP model directory "
                                   "(vitlab save_pretrained, or a Hugging Face CLIPModel/SiglipModel directory).")
    p.add_argument("model_dir", help="model directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,ship"')
    p.add_argument("--templates", help="text file with one prompt template per line, '{}' marks the class "
                                       "(default: 'a photo of a {}.')")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to print per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.set_defaults(func=run)


def read_templates(path: str | None) -> list[str]:
    if path is None:
        return ["a photo of a {}."]
    p = Path(path)
    if not p.is_file():
        raise VitlabError(f"templates file {p} not found")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise VitlabError(f"templates file {p} has no templates")
    return templates


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.clip.zeroshot import fill_template, zero_shot_classifier, zero_shot_predict
    from vitlab.modeldir import CLIP_KINDS, open_model_dir

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        raise VitlabError("--classes needs at least two comma-separated class names")
    if args.top_k < 1 or args.batch_size < 1:
        raise VitlabError("--top-k and --batch-size must be positive")
    templates = read_templates(args.templates)
    for t in templates:
        fill_template(t, "x")  # fail early on a template without a placeholder
    md = open_model_dir(args.model_dir).require(CLIP_KINDS, "vitlab zeroshot")
    model, tokenizer, preprocess = md.model, md.tokenizer, md.preprocess
    classifier = zero_shot_classifier(model, tokenizer, classes, templates)
    k = min(args.top_k, len(classes))
    what = "softmax over the classes" if model.kind == "clip" else "sigmoid, each class on its own"
    print(f"{model.kind} model, {len(classes)} classes, {len(templates)} template(s); probabilities: {what}")
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        probs = zero_shot_predict(model, classifier, preprocess(paths))  # (b, C)
        top = torch.topk(probs, k, dim=-1)
        for path, values, indices in zip(paths, top.values, top.indices):
            print(path)
            for v, i in zip(values.tolist(), indices.tolist()):
                print(f"  {v:7.4f}  {classes[i]}")
    return 0
