"""`vitlab train-clip --loss siglip|clip`: a small CLIP/SigLIP from scratch on CIFAR-10 captions, then zero-shot."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-clip", help="train a small CLIP/SigLIP on CIFAR-10 captions and test it zero-shot",
                       description="Train image and text towers from scratch on CIFAR-10 images captioned from "
                                   "templates ('a photo of a {class}.'), then report zero-shot test accuracy.")
    p.add_argument("--loss", choices=("siglip", "clip"), default="siglip", help="sigmoid (SigLIP) or softmax (CLIP)")
    p.add_argument("--batch-size", type=int, default=256, help="images (and captions) per step (default 256)")
    p.add_argument("--time-budget", type=float, default=5.0, metavar="MIN",
                   help="training time in minutes (default 5)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps even if time is left")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--data", help="CIFAR-10 directory or archive (default: $VITLAB_DATA, else the cache dir)")
    p.add_argument("--out", help="directory to save the model in (usable by `vitlab zeroshot`)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--eval-limit", type=int, help="zero-shot test on the first N test images (default all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.clip.train import LOG_NAME, ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(loss=args.loss, batch_size=args.batch_size, time_budget_min=args.time_budget,
                          max_steps=args.max_steps, lr=args.lr, train_limit=args.train_limit,
                          eval_limit=args.eval_limit, device=args.device, seed=args.seed)
    result = train_clip(cfg, data=args.data, out=args.out)
    print(f"{args.loss}: {result['steps']} steps, {result['images_seen']} images in {result['train_seconds']:.1f} s "
          f"({result['images_per_second']:.0f} img/s), final loss {result['final_loss']}")
    print(f"zero-shot accuracy on {result['eval_images']} CIFAR-10 test images: "
          f"{100 * result['zero_shot_accuracy']:.2f}%")
    if args.out:
        print(f"saved to {args.out} (log: {args.out}/{LOG_NAME})")
    return 0
