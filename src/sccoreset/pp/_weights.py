"""`pp.balanced_weights`: per-cell sampling weights that balance a key or a tuple of keys (scDataset's rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._errors import InputError


def balanced_weights(labels: Sequence | np.ndarray | pd.DataFrame, *, baseline: float = 1000.0) -> np.ndarray:
    """Sampling weight of every cell: ``1 / (count of its combination + baseline)``, normalised to sum to 1.

    Each combination's total weight is then ``count / (count + baseline)`` of the normaliser: large
    combinations are balanced against each other, and the ``baseline`` (scDataset uses 1,000) keeps a rare
    combination from being drawn so often that its few cells are memorised.

    Parameters
    ----------
    labels
        One label per cell, or several keys at once (a DataFrame or a 2-D array of one column per key, e.g.
        cell line and drug): weights then balance their combinations.
    baseline
        Count added to every combination's size (0: plain inverse frequency).

    Returns
    -------
    float64 weights, one per cell, summing to 1.
    """
    if not (isinstance(baseline, int | float) and np.isfinite(baseline) and baseline >= 0):
        raise InputError(f"baseline must be a non-negative number, got {baseline!r}.")
    frame = (
        labels
        if isinstance(labels, pd.DataFrame)
        else pd.DataFrame(np.asarray(labels, dtype=object).reshape(len(labels), -1))
    )
    if len(frame) == 0:
        return np.zeros(0)
    if frame.isna().to_numpy().any():
        raise InputError("balanced_weights: labels hold missing values; drop or label those cells first.")
    combo = (
        pd.MultiIndex.from_frame(frame.astype(str)) if frame.shape[1] > 1 else pd.Index(frame.iloc[:, 0].astype(str))
    )
    codes, _ = pd.factorize(combo)
    counts = np.bincount(codes).astype(np.float64)
    w = 1.0 / (counts[codes] + baseline)
    return w / w.sum()
