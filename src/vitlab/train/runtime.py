"""Where a run executes: device choice (precision lives in `vitlab.speed`)."""

from __future__ import annotations

import torch

from vitlab.errors import VitlabError


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto": CUDA if present, else Apple MPS, else CPU; otherwise the named device, checked."""
    name = name or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError("device cuda requested but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VitlabError("device mps requested but MPS is not available")
    return device
