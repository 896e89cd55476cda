"""How vitlab runs fast on the device at hand: precision, the training step, inference, CPU bf16 kernels.

    precision.py  which precision (fp32 | bf16 autocast | bf16-pure) and autocast
    step.py       TrainStep: forward + loss + backward + clip + optimizer step, used by train and bench
    inference.py  inference_forward: no-grad forward, a bf16 copy in cache-sized slices on CPU
    cpu_bf16.py   fuse_for_cpu_bf16: the module swap that puts the oneDNN kernels (onednn.py) in place
"""

from vitlab.speed.cpu_bf16 import fuse_for_cpu_bf16
from vitlab.speed.inference import CPU_SLICE_BYTES, cache_chunk, inference_forward
from vitlab.speed.precision import PRECISIONS, autocast, bf16_supported, default_mode, resolve_precision
from vitlab.speed.step import TrainStep, bf16_copy, soft_cross_entropy

__all__ = ["CPU_SLICE_BYTES", "PRECISIONS", "TrainStep", "autocast", "bf16_copy", "bf16_supported",
           "cache_chunk", "default_mode", "fuse_for_cpu_bf16", "inference_forward", "resolve_precision",
           "soft_cross_entropy"]
