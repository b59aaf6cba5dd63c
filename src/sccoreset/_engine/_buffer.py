"""The kept cells between steps: features and stored logits on the training device, the rest on the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SCORE_NAMES = ("aum", "confidence", "variability", "forgetting", "loss")


@dataclass
class Buffer:
    """Features, labels, stored logits (for distillation), provenance, scores and ages of the kept cells.

    ``X`` and ``logits`` live on the training device, so a step uploads only its new chunk. ``y`` holds
    the budget classes selection balances; ``targets`` the training labels, one column per task
    (``y[:, None]`` in a single-task run).
    """

    X: torch.Tensor
    y: np.ndarray
    logits: torch.Tensor
    provenance: dict[str, np.ndarray]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.y[:, None]

    @classmethod
    def empty(
        cls, n_features: int, n_classes: int, provenance_like: dict[str, np.ndarray], device: Any, n_tasks: int = 1
    ) -> Buffer:
        prov = {k: v[:0].copy() for k, v in provenance_like.items()}
        for key in ("age", "step_added", "chunk"):
            prov[key] = np.zeros(0, np.int64)
        return cls(
            torch.zeros((0, n_features), dtype=torch.float32, device=device),
            np.zeros(0, np.int64),
            torch.zeros((0, n_classes), dtype=torch.float32, device=device),
            prov,
            {k: np.zeros(0) for k in SCORE_NAMES},
            np.zeros((0, n_tasks), np.int64),
        )

    def __len__(self) -> int:
        return self.y.size

    def host_X(self) -> np.ndarray:
        return self.X.detach().cpu().numpy()

    def to_arrays(self) -> dict[str, Any]:
        """Plain arrays (host), e.g. for a checkpoint."""
        return {
            "X": self.host_X(),
            "y": self.y,
            "logits": self.logits.detach().cpu().numpy(),
            "provenance": dict(self.provenance),
            "scores": dict(self.scores),
            "targets": self.targets,
        }

    @classmethod
    def from_arrays(cls, d: dict[str, Any], device: Any) -> Buffer:
        return cls(
            torch.as_tensor(np.asarray(d["X"], dtype=np.float32)).to(device),
            np.asarray(d["y"], dtype=np.int64),
            torch.as_tensor(np.asarray(d["logits"], dtype=np.float32)).to(device),
            {k: np.asarray(v) for k, v in d["provenance"].items()},
            {k: np.asarray(v) for k, v in d["scores"].items()},
            None if d.get("targets") is None else np.asarray(d["targets"], dtype=np.int64),
        )
