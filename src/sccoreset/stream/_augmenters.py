"""Built-in augmenters for :func:`sccoreset.stream.augment`: held-out metrics and the parameter norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._engine._metrics import classification_metrics
from .._engine._train import host_logits
from .._errors import InputError


def validation(X: np.ndarray, y: np.ndarray, *, prefix: str = "val_", batch_size: int = 4096) -> Callable:
    """Held-out loss, accuracy, macro-F1 and per-class F1 of the event's model on features ``X``, labels ``y``.

    ``X`` are features on the run's gene space (e.g. ``GeneSpace.transform``) and ``y`` integer class
    indices in the run's label order.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.shape[0] != y.shape[0]:
        raise InputError(f"validation: X has {X.shape[0]} rows but y has {y.shape[0]} labels.")

    def fn(event: dict[str, Any]) -> dict[str, Any] | None:
        model = event.get("model")
        if model is None:
            return None
        device = next(iter(model.parameters())).device
        logits = torch.from_numpy(host_logits(model, X, device, batch_size))
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        metrics = classification_metrics(y, logits.argmax(1).numpy(), logits.shape[1])
        return {f"{prefix}loss": loss, **{f"{prefix}{k}": v for k, v in metrics.items()}}

    return fn


def param_norm(event: dict[str, Any]) -> dict[str, Any] | None:
    """The L2 norm of all the event's model parameters, as ``"param_norm"``."""
    model = event.get("model")
    if model is None:
        return None
    with torch.no_grad():
        return {"param_norm": float(torch.sqrt(sum((p.float() ** 2).sum() for p in model.parameters())))}
