"""Cheap up-front checks of the counts in each input."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numba
import numpy as np

from ._source import Source

PEEK_ROWS = 20


class NotRawCountsWarning(UserWarning):
    """The data look log-normalized or scaled, while sccoreset expects raw counts."""


def non_integer_example(data: np.ndarray) -> float | None:
    """The first stored value that is not a whole number (within 1e-3), or None when all are.

    Non-finite values are skipped: the transform reports them, naming the row.
    """
    data = np.asarray(data).ravel()
    if data.dtype.kind in "biu":
        return None
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    at = _first_non_integer(data)
    return float(data[at]) if at >= 0 else None


@numba.njit(nogil=True, cache=True)
def _first_non_integer(data):
    for i in range(data.size):
        v = np.float64(data[i])
        if np.isfinite(v) and abs(v - np.rint(v)) > 1e-3:
            return i
    return -1


def warn_if_not_counts(sources: Sequence[Source]) -> None:
    """Warn, naming the file, when the first rows of an input hold non-integer values.

    Normalized or log-transformed input would be normalized and log-transformed a second time; the
    features would still be consistent across chunks, but not what the user expects. A warning, not
    an error: some pipelines store corrected counts (e.g. ambient-RNA removal) that are not integers.
    """
    for src in sources:
        if src.peeked:  # read when the file was opened to list its genes: no second open
            example = src.peek_non_integer
        else:
            block = src.read_rows(0, min(PEEK_ROWS, src.n_obs))
            src.close()  # reopened when the stream reaches it: long streams keep few files open
            example = non_integer_example(block.data)
            src.peek_non_integer, src.peeked = example, True
        if example is not None:
            warnings.warn(
                f"{src.name}: {src.matrix_name} holds non-integer values (e.g. {example:.4g} in its first {PEEK_ROWS} rows); "
                "raw counts are expected, and log-normalized data would be normalized and log-transformed again. "
                "Pass the raw counts (for an AnnData in memory, e.g. adata.layers['counts']).",
                NotRawCountsWarning,
                stacklevel=3,
            )
