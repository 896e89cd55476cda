"""`vitlab info VARIANT|DIR`: parameters, tokens, FLOPs and activation memory of a model.

A vitlab ViT dir is described from its config.json alone; any other model dir (the CNN teacher, CLIP / SigLIP,
Hugging Face, timm) is opened as every command opens it (`vitlab.modeldir`) and summarised.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitlab.errors import VitlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, tokens, FLOPs per image, activation memory of a model",
                       description="Describe a model variant (e.g. 'Ti/4', 'tutorial') or a saved model directory.")
    p.add_argument("model", help="variant string such as 'Ti/4' or 'B/16', or a directory from save_pretrained")
    p.add_argument("--image-size", type=int, help="input size (default: the variant's or the saved config's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (0: features only)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for the activation-memory estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def describe(cfg, *, batch_size: int = 256) -> dict:
    import torch

    from vitlab.model import VisionTransformer, activation_bytes_per_image, flops_per_image
    from vitlab.model.flops import check_model_size

    with torch.device("meta"):  # shapes only: no memory, no init cost, even for H/14
        check_model_size(cfg)  # meta: only the sanity limits (an absurd width or depth fails at once)
        params = VisionTransformer(cfg).num_params()
    act = activation_bytes_per_image(cfg)
    return {
        "name": cfg.name or "custom", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "width": cfg.width, "depth": cfg.depth, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim,
        "pooling": cfg.pooling, "num_classes": cfg.num_classes, "parameters": params,
        "tokens": cfg.num_tokens, "patches": cfg.num_patches,
        "gflops_per_image_forward": flops_per_image(cfg) / 1e9,
        "gflops_per_image_train": flops_per_image(cfg, training=True) / 1e9,
        "activation_mib_per_image_fp32": act / 2**20,
        "activation_gib_train_batch": act * batch_size / 2**30, "batch_size": batch_size,
    }


def run(args: argparse.Namespace) -> int:
    from vitlab.model import ViTConfig
    from vitlab.model.registry import model_config
    from vitlab.weights import CONFIG_NAME, JsonObject, read_json

    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_classes", args.num_classes))
                 if v is not None}
    if args.batch_size <= 0:
        raise VitlabError("--batch-size must be positive")
    path = Path(args.model)
    config = path / CONFIG_NAME
    d = read_json(config) if path.is_dir() and config.is_file() else None
    if d is not None and d.get("model_type", "vitlab_vit") == "vitlab_vit" and "architecture" not in d:
        cfg = ViTConfig.from_dict(JsonObject({**d, **overrides}, source=d.source))  # no weights read; errors name it
    elif path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return _describe_dir(path, overrides, args)  # any other kind: teacher, CLIP / SigLIP, Hugging Face, timm
    elif "/" in args.model and path.exists():
        raise VitlabError(f"{path} is not a model directory")
    else:
        cfg = model_config(args.model, **overrides)
    if not isinstance(cfg, ViTConfig):  # another registry family (e.g. Swin): its own one-line summary
        return _print_model(_meta_model(cfg), args, kind=type(cfg).__name__.removesuffix("Config").lower())
    return _print_vit(cfg, args)


def _print_vit(cfg, args: argparse.Namespace, *, source: tuple[str, str] | None = None) -> int:
    info = describe(cfg, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({**info, **({"source": source[1]} if source else {})}, indent=2))
        return 0
    rows = [
        ("model", f"{info['name']}  ({cfg.width} wide, {cfg.depth} deep, {cfg.heads} heads, MLP {cfg.mlp_dim})"),
        *([source] if source else []),
        ("input", f"{cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size}, {cfg.num_patches} patches"),
        ("tokens", f"{cfg.num_tokens} (class {int(cfg.class_token)}, registers {cfg.reg_tokens})"),
        ("pooling / classes", f"{cfg.pooling} / {cfg.num_classes}"),
        ("parameters", f"{info['parameters']:,}"),
        ("FLOPs / image", f"{info['gflops_per_image_forward']:.3f} GFLOP forward, "
                          f"{info['gflops_per_image_train']:.3f} GFLOP train step"),
        ("activations (est.)", f"{info['activation_mib_per_image_fp32']:.2f} MiB/image fp32, "
                               f"{info['activation_gib_train_batch']:.2f} GiB at batch {args.batch_size}"),
    ]
    _table(rows)
    return 0


def _describe_dir(path: Path, overrides: dict, args: argparse.Namespace) -> int:
    """A model dir that is not a vitlab ViT's: opened (and converted) as every command opens it."""
    import dataclasses

    from vitlab.model import ViTConfig
    from vitlab.modeldir import open_model_dir

    md = open_model_dir(path, tokenizer=False)
    source = ("source", f"{md.path} ({md.what}, read as {md.origin})")
    if isinstance(md.model.cfg, ViTConfig):  # a Hugging Face / timm ViT, or a vision tower alone
        return _print_vit(dataclasses.replace(md.model.cfg, **overrides), args, source=source)
    if overrides:
        raise VitlabError(f"--image-size and --num-classes describe a ViT; {path} holds a {md.what}")
    return _print_model(md.model, args, kind=md.kind, source=source, md=md)


def _meta_model(cfg):
    import torch

    from vitlab.model.registry import create_model

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return create_model(cfg)


def _print_model(model, args: argparse.Namespace, *, kind: str, source: tuple[str, str] | None = None,
                 md=None) -> int:
    """Kinds without the ViT's cost model: what the model is, its parameters, input and classes."""
    from vitlab.modeldir import CLIP_KINDS

    params = model.num_params()
    info = {"name": getattr(model.cfg, "name", "") or kind, "kind": kind, "parameters": params,
            "summary": model.summary()}
    rows = [("model", info["summary"]), *([source] if source else [])]
    if kind in CLIP_KINDS:
        v, t = model.cfg.vision, model.cfg.text
        info.update(embed_dim=model.cfg.embed_dim, image_size=v.image_size, vision=v.summary(model.vision.num_params()),
                    text=f"{t.width}w {t.depth}d {t.heads}h, context {t.context_length}, vocabulary {t.vocab_size}")
        rows += [("vision tower", info["vision"]), ("text tower", info["text"])]
    else:
        info["num_classes"] = int(getattr(model.cfg, "num_classes", 0))
        rows.append(("classes", str(info["num_classes"])))
    if md is not None:
        pre = md.preprocess
        info["input"] = {"size": pre.output_size, "mean": list(pre.mean), "std": list(pre.std)}
        rows.append(("input", f"{pre.output_size}x{pre.output_size}, {pre.resample} resize "
                              f"({pre.resize}{', crop' if pre.crop_size else ''}), mean {_round(pre.mean)}, "
                              f"std {_round(pre.std)}"))
    elif hasattr(model.cfg, "image_size"):
        info["image_size"] = model.cfg.image_size
        rows.append(("input", f"{model.cfg.image_size}x{model.cfg.image_size}"))
    rows.append(("parameters", f"{params:,}"))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _table(rows)
    return 0


def _round(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _table(rows: list[tuple[str, str]]) -> None:
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
