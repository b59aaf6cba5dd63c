"""Pick the torch device."""

from __future__ import annotations

import torch

from .._errors import InputError


def resolve_device(device: str | torch.device | None) -> str:
    """``device`` as a string; None picks CUDA, then MPS, then CPU."""
    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={name!r}: CUDA is not available on this machine.")
    return name
