"""`vitlab info VARIANT|DIR`: parameters, tokens, FLOPs and activation memory of a model."""

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
    from vitlab.model import ViTConfig, parse_variant
    from vitlab.weights import CONFIG_NAME, JsonObject, read_json

    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_classes", args.num_classes))
                 if v is not None}
    path = Path(args.model)
    if path.is_dir():
        d = read_json(path / CONFIG_NAME)
        cfg = ViTConfig.from_dict(JsonObject({**d, **overrides}, source=d.source))  # errors name the file
    elif "/" in args.model and path.exists():
        raise VitlabError(f"{path} is not a model directory")
    else:
        cfg = parse_variant(args.model, **overrides)
    if args.batch_size <= 0:
        raise VitlabError("--batch-size must be positive")
    info = describe(cfg, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("model", f"{info['name']}  ({cfg.width} wide, {cfg.depth} deep, {cfg.heads} heads, MLP {cfg.mlp_dim})"),
        ("input", f"{cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size}, {cfg.num_patches} patches"),
        ("tokens", f"{cfg.num_tokens} (class {int(cfg.class_token)}, registers {cfg.reg_tokens})"),
        ("pooling / classes", f"{cfg.pooling} / {cfg.num_classes}"),
        ("parameters", f"{info['parameters']:,}"),
        ("FLOPs / image", f"{info['gflops_per_image_forward']:.3f} GFLOP forward, "
                          f"{info['gflops_per_image_train']:.3f} GFLOP train step"),
        ("activations (est.)", f"{info['activation_mib_per_image_fp32']:.2f} MiB/image fp32, "
                               f"{info['activation_gib_train_batch']:.2f} GiB at batch {args.batch_size}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0
