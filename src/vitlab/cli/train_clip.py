"""`vitlab train-clip --loss siglip|clip`: a small CLIP/SigLIP from scratch on CIFAR-10 captions, then zero-shot.

Image and text towers are trained from scratch on CIFAR-10 images captioned from templates ('a photo of a
{class}.'); zero-shot test accuracy is evaluated after every epoch and printed at the end. The run goes
through the same loop as `vitlab train`, with the same option names: by default a 5-minute --time-budget
(evaluation and saving included; --time-budget 0 --epochs N for a fixed length), --resume RUN_DIR to continue
an interrupted run exactly, metrics.jsonl / steps.jsonl / curves.png / checkpoint/ in the run dir. The run
dir is also a model dir `vitlab zeroshot RUN_DIR` reads. Exit codes and --on-nonfinite: as `vitlab train`.
"""

from __future__ import annotations

import argparse

from vitlab.cli._flags import add_config_flags, given
from vitlab.cli.train import add_run_arguments, is_main_process, out_dir, refuse_overrides_on_resume
from vitlab.clip.train import ClipTrainConfig
from vitlab.train.guard import stops_on_sigterm
from vitlab.train.recipes import with_overrides

# The names before train-clip shared `vitlab train`'s.
ALIASES = {"train_subset": "--train-limit", "test_subset": "--eval-limit"}
# The image-side augmentation: the targets are captions, so label smoothing and mixup/cutmix do not apply.
AUGMENT = ("crop_padding", "padding_mode", "flip", "alternate_flip", "policy", "randaug_n", "randaug_m")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-clip", help="train a small CLIP/SigLIP on CIFAR-10 captions and test it zero-shot",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    add_config_flags(p, ClipTrainConfig, aliases=ALIASES, augment=AUGMENT)
    p.set_defaults(func=run)


@stops_on_sigterm  # exit 143, resumable (vitlab.train.guard)
def run(args: argparse.Namespace) -> int:
    from vitlab.clip.train import resume_clip, train_clip
    from vitlab.train.budget import process_start

    progress = not args.no_progress
    overrides = given(args, ClipTrainConfig, augment=AUGMENT)
    if args.resume is not None:
        refuse_overrides_on_resume(args, overrides)
        result = resume_clip(args.resume, data=args.data, device=args.device, progress=progress,
                             started_at=process_start())
    else:
        config = with_overrides(ClipTrainConfig(), **overrides)
        result = train_clip(config, out=out_dir(args.out, f"train-clip-{config.loss}"), data=args.data,
                            device=args.device, progress=progress, download=args.download,
                            started_at=process_start())
    if not is_main_process():  # torchrun: rank 0 prints the result
        return 0
    loss = result["config"]["loss"]
    print(f"{loss}: {result['steps']} steps, {result['images_seen']} images in {result['train_seconds']:.1f} s "
          f"({result['images_per_second']:.0f} img/s), final loss {result['final_loss']}")
    print(f"zero-shot accuracy on {result['eval_images']} {result['dataset']} test images: "
          f"{100 * result['zero_shot_accuracy']:.2f}%")
    print(f"run: {result['run_dir']} (a model dir for `vitlab zeroshot`)")
    return 0
