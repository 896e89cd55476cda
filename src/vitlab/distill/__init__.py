"""Distillation from a CNN teacher (DeiT): the teacher network vitlab trains itself, and the losses.

    teacher.py  TeacherNet: a small airbench-style CNN (whitened first conv, BatchNorm, GELU)
    losses.py   DeiT's hard and soft distillation losses for a ViT with a distillation token
"""

from vitlab.distill.losses import DISTILL_MODES, distillation_loss
from vitlab.distill.teacher import TeacherConfig, TeacherNet, whitening_weights

__all__ = ["DISTILL_MODES", "TeacherConfig", "TeacherNet", "distillation_loss", "whitening_weights"]
