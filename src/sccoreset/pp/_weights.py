"""`pp.balanced_weights`: per-cell sampling weights that balance a key or a tuple of keys (scDataset's rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._errors import InputError
from .._io._open_files import each_bounded
from .._io._sources import Source
from .._utils import logger


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


def source_weights(
    sources: Sequence[Source], keys: str | Sequence[str], *, baseline: float = 1000.0
) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`balanced_weights` of every cell of a stream, read from obs only (never the counts).

    Combinations of ``keys`` are counted over all files together. Cells with a missing value (NaN/None) in
    any of the keys get weight 0 (they are never drawn) and are counted, per file, with a log message.

    Parameters
    ----------
    sources
        The opened inputs.
    keys
        One obs key or several, whose combinations are balanced.
    baseline
        Count added to every combination's size (see :func:`balanced_weights`).

    Returns
    -------
    One float64 weight array per source (one weight per logical row), summing to 1 over all sources (all
    zeros when no cell has a value for every key); and the number of cells per source whose weight is 0
    because a key is missing.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise InputError(f"weight keys must be one or more obs keys, got {keys!r}.")
    if not (isinstance(baseline, int | float | np.integer | np.floating) and np.isfinite(baseline) and baseline >= 0):
        raise InputError(f"baseline must be a non-negative number, got {baseline!r}.")
    sources = list(sources)
    if not sources:
        return [], np.zeros(0, dtype=np.int64)
    sizes = np.array([s.n_obs for s in sources], dtype=np.int64)
    n = int(sizes.sum())
    missing = np.zeros(n, dtype=bool)
    codes = np.zeros(n, dtype=np.int64)
    for key in keys:
        values, miss = [], []
        for src in each_bounded(sources):
            v, m = src.read_labels(key)  # an absent column raises InputError naming the file and the key
            values.append(v)
            miss.append(m)
        key_missing = np.concatenate(miss)
        missing |= key_missing
        key_codes, uniques = pd.factorize(np.concatenate(values))  # values are str (None where missing)
        key_codes[key_missing] = 0  # left out below; keeps the -1 of None out of the product
        codes = codes * max(len(uniques), 1) + key_codes
        codes = pd.factorize(codes)[0].astype(np.int64)  # renumbered: products of many keys stay small
    w = np.zeros(n)
    kept = ~missing
    if kept.any():
        c = pd.factorize(codes[kept])[0]
        inv = 1.0 / (np.bincount(c).astype(np.float64)[c] + float(baseline))
        w[kept] = inv / inv.sum()
    n_missing = np.array([int(m.sum()) for m in np.split(missing, np.cumsum(sizes)[:-1])], dtype=np.int64)
    if n_missing.any():
        per_file = [(s.name, int(k)) for s, k in zip(sources, n_missing, strict=True) if k]
        shown = "; ".join(f"{name}: {k}" for name, k in per_file[:10]) + (" ..." if len(per_file) > 10 else "")
        logger.warning(
            f"weights over obs{list(keys)}: {int(n_missing.sum())} cells with a missing value (NaN/None) get "
            f"weight 0 and are never drawn ({shown})."
        )
    return np.split(w, np.cumsum(sizes)[:-1]), n_missing
