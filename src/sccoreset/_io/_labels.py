"""Missing labels (NaN, None, categorical code -1, masked): never a class of their own."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .._errors import InputError
from ._open_files import each_bounded
from ._source import Source

MissingLabels = Literal["skip", "error"]
MISSING_LABELS = ("skip", "error")


class MissingLabelsWarning(UserWarning):
    """Cells whose label is missing (NaN/None) were left out of the stream."""


def check_policy(missing_labels: str) -> None:
    if missing_labels not in MISSING_LABELS:
        raise InputError(f"missing_labels must be one of {MISSING_LABELS}, got {missing_labels!r}.")


def missing_labels_error(src: Source, key: str, missing: np.ndarray, rows: np.ndarray) -> InputError:
    """The error for ``missing_labels="error"``; ``rows`` are the file rows of the cells in ``missing``."""
    first = int(rows[np.flatnonzero(missing)[0]])
    return InputError(
        f"{src.name}: obs[{key!r}] is missing (NaN/None) for {int(missing.sum())} cells, first in row {first}. "
        "Label or drop them, or pass missing_labels='skip' to leave them out."
    )


def warn_missing_labels(sources: Sequence[Source], key: str, n_missing: Sequence[int], stacklevel: int = 3) -> None:
    """One warning counting the left-out cells of every file that has some."""
    per_file = [(s.name, int(n)) for s, n in zip(sources, n_missing, strict=True) if n]
    if not per_file:
        return
    shown = "; ".join(f"{name}: {n}" for name, n in per_file[:10]) + (" ..." if len(per_file) > 10 else "")
    warnings.warn(
        f"obs[{key!r}]: {sum(n for _, n in per_file)} cells with a missing label (NaN/None) are left out ({shown}).",
        MissingLabelsWarning,
        stacklevel=stacklevel,
    )


def count_missing_labels(
    sources: Sequence[Source], key: str, missing_labels: MissingLabels = "skip", *, stacklevel: int = 4
) -> np.ndarray:
    """Cells with a missing label per source; raises (``"error"``) or warns (``"skip"``) when there are any."""
    check_policy(missing_labels)
    counts = np.zeros(len(sources), dtype=np.int64)
    for i, src in enumerate(each_bounded(sources)):
        _, missing = src.read_labels(key)
        counts[i] = int(missing.sum())
        if counts[i] and missing_labels == "error":
            raise missing_labels_error(src, key, missing, src.physical_rows())
    if missing_labels == "skip":
        warn_missing_labels(sources, key, counts, stacklevel=stacklevel)
    return counts
