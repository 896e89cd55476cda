"""Progressive resizing: train the early steps on smaller images (fewer tokens), then on the full size.

A schedule "16:0.4,24:0.7" trains at 16 px until 40% of the run's steps, at 24 px until 70%, then at the
data's own size; the model resamples its positions for each grid (`VisionTransformer._pos_embed`). Sizes are
fractions of the run's total steps, so a time budget that moves the end of the run moves the switches with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError


def parse_resize_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """"16:0.4,24:0.7" -> ((16, 0.4), (24, 0.7)): (size, until this fraction of the steps), in order."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, sep, until = part.partition(":")
        try:
            stage = (int(size), float(until))
        except ValueError:
            stage = None
        if not sep or stage is None or stage[0] <= 0 or not 0 < stage[1] < 1:
            raise VitlabError(f"resize schedule {text!r}: each stage is SIZE:UNTIL with UNTIL a fraction of the "
                              f"steps in (0, 1), e.g. '16:0.4,24:0.7'")
        if stages and stage[1] <= stages[-1][1]:
            raise VitlabError(f"resize schedule {text!r}: the fractions must increase")
        stages.append(stage)
    return tuple(stages)


@dataclass(frozen=True)
class ResizeSchedule:
    stages: tuple[tuple[int, float], ...]  # (size, until fraction), then `full`
    full: int

    @classmethod
    def parse(cls, text: str, *, full: int) -> ResizeSchedule:
        stages = parse_resize_schedule(text)
        bad = [s for s, _ in stages if s > full]
        if bad:
            raise VitlabError(f"resize schedule {text!r}: sizes {bad} are larger than the data's {full} px")
        return cls(stages, full)

    @property
    def sizes(self) -> list[int]:
        return [s for s, _ in self.stages] + [self.full]

    def boundaries(self, total: int) -> list[int]:
        """The step at which each stage ends, for a run of `total` steps (the last stage ends at `total`)."""
        return [int(round(f * total)) for _, f in self.stages] + [total]

    def size_at(self, step: int, total: int) -> int:
        for size, end in zip(self.sizes, self.boundaries(total)):
            if step < end:
                return size
        return self.full

    def work(self, step: int, total: int, cost: dict[int, float]) -> float:
        """Steps `step`..`total`-1 in units of a full-size step, each stage's step weighted by `cost[size]`."""
        units, begin = 0.0, 0
        for size, end in zip(self.sizes, self.boundaries(total)):
            units += max(0, min(end, total) - max(begin, step)) * cost[size]
            begin = end
        return units

    def resize(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """(B, C, H, W) float images -> (B, C, size, size), antialiased (nothing to do at the full size)."""
        if size == images.shape[-1]:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
