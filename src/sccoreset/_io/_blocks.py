"""CSR row blocks and the reusable buffers they are read into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class CSRBlock:
    """Rows ``[start, stop)`` of a counts matrix as CSR arrays (``indptr`` starts at 0)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1


class ReadBuffers:
    """Growing data/indices arrays that consecutive reads fill one after another, then reuse."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._offsets: dict[str, int] = {}
        self._used = 0

    def reset(self) -> None:
        self._used = 0
        self._offsets = dict.fromkeys(self._offsets, 0)

    def take(self, n: int, data_dtype: np.dtype, index_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Views of the next ``n`` free elements; a grown array leaves earlier views on the old one intact."""
        out = []
        for key, dtype in (("data", data_dtype), ("indices", index_dtype)):
            arr = self._arrays.get(key)
            start = self._used - self._offsets.get(key, 0)
            if arr is None or arr.dtype != dtype or arr.size < start + n:
                self._arrays[key] = arr = np.empty(int((self._used + n) * 1.5) + 1024, dtype=dtype)
                self._offsets[key], start = self._used, 0
            out.append(arr[start : start + n])
        self._used += n
        return out[0], out[1]


def empty_block() -> CSRBlock:
    return CSRBlock(np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64))


def block_from_matrix(x: Any) -> CSRBlock:
    """A CSR block of a scipy sparse or dense matrix (a copy when it must be converted)."""
    import scipy.sparse as sp

    m = sp.csr_matrix(x) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    m.sort_indices()
    return CSRBlock(m.data, m.indices, m.indptr.astype(np.int64))


def concat_blocks(blocks: Sequence[CSRBlock]) -> CSRBlock:
    """Stack row blocks into one (new arrays)."""
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        return empty_block()
    sizes = np.array([b.indptr[-1] for b in blocks], dtype=np.int64)
    shifts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    indptr = np.concatenate([[0]] + [b.indptr[1:] + s for b, s in zip(blocks, shifts, strict=True)])
    data = np.concatenate([b.data[: b.indptr[-1]] for b in blocks])
    indices = np.concatenate([b.indices[: b.indptr[-1]] for b in blocks])
    return CSRBlock(data, indices, indptr.astype(np.int64))


def take_rows(block: CSRBlock, keep: np.ndarray) -> CSRBlock:
    """The rows of ``block`` where ``keep`` (bool) is True, as a new block."""
    lengths = np.diff(block.indptr)[keep]
    starts = block.indptr[:-1][keep]
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    # element positions of the kept rows: each row's start repeated, plus 0..length-1
    pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
    return CSRBlock(block.data[pos], block.indices[pos], indptr)


def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split rows (any order) into ``[lo, hi)`` runs of consecutive increasing rows, in the given order."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    lo = np.concatenate([[0], breaks])
    hi = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(lo, hi, strict=True)]
