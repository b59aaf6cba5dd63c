"""The step event (one plain dict per step, with a typed schema) and the per-step history built from them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

TIMINGS = ("wait_seconds", "train_seconds", "select_seconds", "eval_seconds")


class StepEvent(TypedDict, total=False):
    """What the loop reports after each step.

    ``step`` is ``"final"`` for the consolidation on the final buffer, ``"refit"`` for a pass of ``refit_heads``.
    ``n_chunk`` counts the step's cells over all ranks, ``n_local`` those this rank read (the same in one
    process). ``accuracy``, ``macro_f1`` and ``f1`` are present when evaluation data was given (of the
    first task; in a multi-task run ``task_metrics`` holds them for every task, in order).
    """

    step: int | str
    chunk: int
    n_chunk: int
    n_local: int
    n_skipped: int
    n_buffer: int
    train_loss: float
    epoch_losses: np.ndarray
    buffer_class_counts: np.ndarray
    buffer_chunk_counts: np.ndarray
    buffer_file_counts: np.ndarray
    chunk_class_counts: np.ndarray
    wait_seconds: float
    train_seconds: float
    select_seconds: float
    eval_seconds: float
    accuracy: float
    macro_f1: float
    f1: np.ndarray
    task_metrics: list[dict[str, Any]]


def _padded(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    return np.array([np.pad(np.asarray(r), (0, width - len(r))) for r in rows], dtype=np.int64).reshape(-1, width)


def _nan_padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of different lengths (early stopping within a step ends some early) padded with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass
class History:
    """Per-step arrays (one row per chunk step) plus the final consolidation's figures.

    The layout of :meth:`to_uns` is what ``uns["sccoreset"]["history"]`` holds and every reader
    (plots, benchmarks, resume) uses.
    """

    arrays: dict[str, np.ndarray]
    final: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_events(
        cls, events: Sequence[Mapping[str, Any]], n_classes: int, task_names: Sequence[str] | None = None
    ) -> History:
        """The history of ``events``; ``n_classes`` budget classes; ``task_names`` name the tasks of a multi-task run."""
        steps = [e for e in events if e["step"] not in ("final", "refit")]
        n_chunks = max((len(e["buffer_chunk_counts"]) for e in events), default=0)
        n_files = max((len(e["buffer_file_counts"]) for e in events), default=0)
        a: dict[str, np.ndarray] = {
            "step": np.array([e["step"] for e in steps], dtype=np.int64),
            "chunk": np.array([e["chunk"] for e in steps], dtype=np.int64),
            "n_chunk": np.array([e["n_chunk"] for e in steps], dtype=np.int64),
            "n_local": np.array([e.get("n_local", e["n_chunk"]) for e in steps], dtype=np.int64),
            "n_skipped": np.array([e.get("n_skipped", 0) for e in steps], dtype=np.int64),
            "train_loss": np.array([e["train_loss"] for e in steps], dtype=np.float64),
            "epoch_losses": _nan_padded([e["epoch_losses"] for e in steps]),
            "buffer_class_counts": _padded([e["buffer_class_counts"] for e in steps], n_classes),
            "chunk_class_counts": _padded([e["chunk_class_counts"] for e in steps], n_classes),
            "buffer_chunk_counts": _padded([e["buffer_chunk_counts"] for e in steps], n_chunks),
            "buffer_file_counts": _padded([e["buffer_file_counts"] for e in steps], n_files),
        }
        for key in TIMINGS:
            a[key] = np.array([e[key] for e in steps], dtype=np.float64)
        if steps and "macro_f1" in steps[0]:
            a["accuracy"] = np.array([e["accuracy"] for e in steps], dtype=np.float64)
            a["macro_f1"] = np.array([e["macro_f1"] for e in steps], dtype=np.float64)
            a["f1"] = np.array([e["f1"] for e in steps], dtype=np.float64).reshape(len(steps), -1)
        if steps and "task_metrics" in steps[0] and task_names is not None:
            a["tasks"] = {
                name: {
                    "accuracy": np.array([e["task_metrics"][t]["accuracy"] for e in steps], dtype=np.float64),
                    "macro_f1": np.array([e["task_metrics"][t]["macro_f1"] for e in steps], dtype=np.float64),
                    "f1": np.array([e["task_metrics"][t]["f1"] for e in steps], dtype=np.float64).reshape(
                        len(steps), -1
                    ),
                }
                for t, name in enumerate(task_names)
            }
        final: dict[str, Any] = {}
        for e in events:  # the consolidation, then any refit passes: the last one's metrics are the model's
            if e["step"] == "final":
                final = {"train_loss": e["train_loss"], "epoch_losses": np.asarray(e["epoch_losses"], np.float64)}
            elif e["step"] == "refit":
                final["refit_losses"] = np.append(final.get("refit_losses", np.zeros(0)), e["train_loss"])
            else:
                continue
            if "macro_f1" in e:
                final.update(accuracy=e["accuracy"], macro_f1=e["macro_f1"], f1=np.asarray(e["f1"]))
            if "task_metrics" in e and task_names is not None:
                final["tasks"] = {
                    name: {k: np.asarray(v) if k == "f1" else v for k, v in e["task_metrics"][t].items()}
                    for t, name in enumerate(task_names)
                }
        return cls(a, final)

    def __len__(self) -> int:
        return len(self.arrays["step"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def to_uns(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.arrays)
        if self.final:
            out["final"] = dict(self.final)
        return out

    @classmethod
    def from_uns(cls, d: Mapping[str, Any]) -> History:
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in d.items() if k not in ("final", "tasks")}
        if "tasks" in d:
            arrays["tasks"] = {name: {k: np.asarray(v) for k, v in m.items()} for name, m in d["tasks"].items()}
        final = dict(d.get("final", {}))
        return cls(arrays, final)
