"""`[torchrun ...] tests/clip/_torchrun_clip.py DATA OUT BATCH LOSS`: a tiny train-clip run whose only randomness is
the data order (no crop, flip or caption choice), so a run on N processes can be compared with one process at the
same global batch (tests/clip/test_clip_ddp.py)."""

import sys

from vitlab.clip.train import ClipTrainConfig, train_clip
from vitlab.data import AugmentConfig


def tiny_config(loss: str, batch_size: int) -> ClipTrainConfig:
    return ClipTrainConfig(loss=loss, width=16, depth=1, heads=2, text_width=16, text_depth=1, batch_size=batch_size,
                           time_budget=0, epochs=2, precision="fp32", eval_batch_size=20,
                           templates=("a photo of a {}.",), augment=AugmentConfig(
                               crop_padding=0, flip=False, policy="none", mixup_alpha=0.0, cutmix_alpha=0.0,
                               label_smoothing=0.0))


if __name__ == "__main__":
    data, out, batch, loss = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    train_clip(tiny_config(loss, batch), out=out, data=data, device="cpu", progress=False)
