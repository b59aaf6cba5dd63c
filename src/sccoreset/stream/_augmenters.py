"""Built-in augmenters for :func:`sccoreset.stream.augment`: held-out metrics and the parameter norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._engine._metrics import classification_metrics
from .._engine._train import host_logits
from .._errors import InputError


def validation(
    X: np.ndarray, y: np.ndarray, *, task: str | int | None = None, prefix: str = "val_", batch_size: int = 4096
) -> Callable:
    """Held-out loss, accuracy, macro-F1 and per-class F1 of the event's model on features ``X``, labels ``y``.

    ``X`` are features on the run's gene space (e.g. ``GeneSpace.transform``) and ``y`` integer class
    indices in the run's label order (``uns[key]["tasks"][label_key]``; the order of ``event["classes"]``).
    In a multi-task run, ``y`` holds the labels of one task, ``task`` (a label key or its position, default
    the first), scored on that task's head; or one column per task, ``(n, n_tasks)``: the first task's
    metrics are ``{prefix}loss`` ..., the others' ``{prefix}{label key}_loss`` ....
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
        sizes = list(event.get("task_sizes") or [logits.shape[1]])
        keys = list(event.get("label_keys") or [str(t) for t in range(len(sizes))])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if y.ndim == 2:
            if y.shape[1] != len(sizes):
                raise InputError(f"validation: y has {y.shape[1]} columns, the run {len(sizes)} tasks {keys}.")
            picked = list(range(len(sizes)))
        else:
            t = 0 if task is None else keys.index(task) if isinstance(task, str) and task in keys else task
            if not isinstance(t, int | np.integer) or not 0 <= t < len(sizes):
                raise InputError(f"validation: task={task!r} is not one of the run's tasks {keys}.")
            picked = [int(t)]
        out: dict[str, Any] = {}
        for i, t in enumerate(picked):
            lt = logits[:, offsets[t] : offsets[t + 1]]
            yt = torch.from_numpy(y if y.ndim == 1 else np.ascontiguousarray(y[:, t]))
            name = prefix if i == 0 else f"{prefix}{keys[t]}_"
            metrics = classification_metrics(yt.numpy(), lt.argmax(1).numpy(), lt.shape[1])
            out[f"{name}loss"] = float(torch.nn.functional.cross_entropy(lt, yt))
            out.update({f"{name}{k}": v for k, v in metrics.items()})
        return out

    return fn


def param_norm(event: dict[str, Any]) -> dict[str, Any] | None:
    """The L2 norm of all the event's model parameters, as ``"param_norm"``."""
    model = event.get("model")
    if model is None:
        return None
    with torch.no_grad():
        return {"param_norm": float(torch.sqrt(sum((p.float() ** 2).sum() for p in model.parameters())))}
