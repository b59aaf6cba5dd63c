"""Numba kernels on CSR row blocks: the hot path of reading a stream.

They release the GIL, so a background thread can transform the next chunk while the main thread
trains. Per-element arithmetic is float32 (as scanpy's on float32 counts): it is 3-4x faster than
float64 here, and the statistics are still accumulated in float64.
"""

from __future__ import annotations

import numba
import numpy as np

# bits of the per-row ``bad`` flags the kernels set
BAD_VALUE = 1  # negative or non-finite count
BAD_INDEX = 2  # a column index outside [0, n_vars)
BAD_INDPTR = 4  # indptr decreasing or pointing past the stored data
LOG_TABLE = 32  # per-row table of log1p of the small whole counts 0 .. LOG_TABLE - 1 (transform)


def bad_row_message(bad: np.ndarray, rows: np.ndarray | None, row_offset: int, source: str, what: str) -> str:
    """The error message for the first flagged row (structural damage is reported before bad values)."""
    for bit in (BAD_INDPTR, BAD_INDEX, BAD_VALUE):
        hit = np.flatnonzero(bad & bit)
        if hit.size:
            break
    i = int(hit[0])
    row = int(rows[i]) if rows is not None else i + row_offset
    if bit == BAD_INDPTR:
        return (
            f"{source}: {what}/indptr is decreasing or points past the stored data at row {row}; the file is corrupt."
        )
    if bit == BAD_INDEX:
        return (
            f"{source}: {what}/indices out of range (a column index < 0 or >= the number of genes), "
            f"first in row {row}; the file is corrupt."
        )
    return (
        f"{source}: {what} holds negative or non-finite (NaN/inf) values, first in row {row}; raw counts are expected."
    )


@numba.njit(nogil=True, cache=True, inline="always")
def _row_sum(data, lo, hi):
    """Sum of a row's values (float32) and 1 if any is negative or non-finite."""
    s = np.float32(0.0)
    flag = 0
    for j in range(lo, hi):
        v = data[j]
        if not (v >= 0.0) or v == np.inf:
            flag = 1
        s += v
    return s, flag


@numba.njit(nogil=True, cache=True)
def _transform_rows(r0, r1, data, indices, indptr, col_map, mean, inv_std, fill, target_sum, max_value, out, bad):
    """Rows ``[r0, r1)`` of :func:`csr_transform` (one block of rows, one scratch allocation)."""
    n_cols = col_map.size
    u_last = np.uint64(max(n_cols - 1, 0))
    nnz = min(data.size, indices.size)
    width = 0
    for i in range(r0, r1):  # rows within the stored data only: a corrupt indptr asks for no huge scratch
        width = max(width, min(indptr[i + 1], nnz) - max(indptr[i], 0))
    cols = np.empty(max(width, 0), np.int32)
    vals = np.empty(max(width, 0), np.float32)
    table = np.empty(LOG_TABLE, np.float32)
    for i in range(r0, r1):
        lo = indptr[i]
        hi = indptr[i + 1]
        if lo < 0 or hi < lo or hi > nnz:
            bad[i] = 4  # BAD_INDPTR
            out[i, :] = fill
            continue
        if n_cols == 0 and hi > lo:
            bad[i] = 2  # BAD_INDEX: no column exists
            out[i, :] = fill
            continue
        s = np.float32(0.0)
        ok = True
        in_range = True
        k = 0
        row_data = data[lo:hi]  # views from 0: no negative-index handling in the loop
        row_indices = indices[lo:hi]
        for j in range(hi - lo):  # one straight block: a branch here, even one never taken, cost 1.6x
            v = row_data[j]
            ok &= (v >= 0.0) & (v != np.inf)  # False for negative, NaN and inf
            s += v
            u = np.uint64(row_indices[j])  # a negative index wraps to a huge one: one compare checks both ends
            in_range &= u <= u_last
            c = col_map[min(u, u_last)]  # clamped: a bad index never reads out of bounds
            cols[k] = c
            vals[k] = v
            k += c >= 0
        if not in_range:
            bad[i] = 2  # BAD_INDEX
            out[i, :] = fill
            continue
        bad[i] = 0 if ok else 1
        scale = np.float32(target_sum / s) if s > 0 else np.float32(0.0)
        out[i, :] = fill
        n_table = min(LOG_TABLE, k)  # log1p of the small whole counts, once per row
        for t in range(n_table):
            table[t] = np.log1p(np.float32(t) * scale)
        top = np.float32(n_table - 1)
        for t in range(k):
            c = cols[t]
            v = vals[t]
            w = np.int32(min(v if v >= 0 else np.float32(-1.0), top))  # NaN -> -1, inf -> top
            if w >= 0 and np.float32(w) == v:
                lv = table[w]
            else:
                lv = np.log1p(np.float32(v) * scale)
            x = (lv - mean[c]) * inv_std[c]
            out[i, c] = min(max(x, -max_value), max_value)


@numba.njit(parallel=True, nogil=True, cache=True)
def csr_transform(data, indices, indptr, col_map, mean, inv_std, fill, target_sum, max_value, out, bad):
    """normalize_total -> log1p -> map columns -> (x - mean) * inv_std -> clip, into dense ``out``.

    ``mean``, ``inv_std`` and ``fill`` are float32; ``fill[c]`` is the (clipped) value of a zero in
    target column ``c``. ``bad[i]`` gets the bits of what is wrong with row ``i`` (``BAD_VALUE``: a
    negative or non-finite value, ``BAD_INDEX``: a column index out of range, ``BAD_INDPTR``); the
    checks cost one predictable compare per element and keep a corrupt file from reading out of bounds.

    One pass over a row sums it, checks its column indices and compacts the entries on the gene list
    into a scratch buffer without branching (about 1 in 10 entries is kept, at random: a branch there
    mispredicts often); a second, short pass transforms only those, taking the log1p of small whole
    counts from a per-row table (the same float32 arithmetic). Rows go in blocks of 256 so scratch is
    allocated once per block.
    """
    n = indptr.size - 1
    for block in numba.prange((n + 255) // 256):
        r0 = block * 256
        _transform_rows(r0, min(n, r0 + 256), data, indices, indptr, col_map, mean, inv_std, fill, target_sum,
                        max_value, out, bad)  # fmt: skip


@numba.njit(nogil=True, cache=True)
def csr_transform_serial(data, indices, indptr, col_map, mean, inv_std, fill, target_sum, max_value, out, bad):
    """:func:`csr_transform` in the calling thread only: for worker threads that each transform a chunk."""
    n = indptr.size - 1
    for block in range((n + 255) // 256):
        r0 = block * 256
        _transform_rows(r0, min(n, r0 + 256), data, indices, indptr, col_map, mean, inv_std, fill, target_sum,
                        max_value, out, bad)  # fmt: skip


TABLE = 64  # per-row table of the statistics of the small whole counts 0 .. TABLE - 1


@numba.njit(nogil=True, cache=True)
def csr_accumulate(data, indices, indptr, col_map, target_sum, acc, bad):
    """Add per-column sums of x, x**2, log1p(x), log1p(x)**2 of normalized rows into ``acc`` (n_genes, 4).

    Runs in the calling thread (workers each accumulate their own chunks). ``col_map`` maps the
    block's columns onto the target genes (-1: not a target). Returns the number of flagged rows
    (``bad`` holds the bits, as in :func:`csr_transform`).

    Most stored counts are small whole numbers, and within a row they share one scale factor: the four
    statistics of counts ``0 .. TABLE - 1`` are computed once per row (the same float32 arithmetic as
    for any other value, so the sums are bit for bit those of computing every element), which takes
    the log1p off the per-element path. ``acc`` is gene-major so the four adds of an element touch
    one cache line.
    """
    n = indptr.size - 1
    n_cols = col_map.size
    nnz = min(data.size, indices.size)
    table = np.empty((TABLE, 4), dtype=np.float64)
    slot = np.empty(0, dtype=np.int32)  # each element's table entry, for the row being summed
    for i in range(n):
        lo = indptr[i]
        hi = indptr[i + 1]
        if lo < 0 or hi < lo or hi > nnz:
            bad[i] = 4  # BAD_INDPTR
            continue
        bad[i] = 0
        if slot.size < hi - lo:
            slot = np.empty(2 * (hi - lo), dtype=np.int32)
        n_table = min(TABLE, hi - lo + 1)  # short rows: fewer table entries than elements
        top = np.float32(n_table - 1)
        # one pass that vectorizes: every value's table entry, whether all are whole numbers in the
        # table (so also finite and >= 0), and whether every column index is in range
        whole = True
        in_range = True
        for j in range(lo, hi):
            v = data[j]
            ix = indices[j]
            t = np.int32(min(v if v >= 0 else np.float32(-1.0), top))  # NaN -> -1, inf -> top: safe to convert
            slot[j - lo] = t
            whole &= (t >= 0) & (np.float32(t) == v)
            in_range &= (ix >= 0) & (ix < n_cols)
        if not in_range:
            bad[i] = 2  # BAD_INDEX
            continue
        if whole:
            s = np.float32(0.0)
            for j in range(lo, hi):
                s += data[j]
        else:
            s, flag = _row_sum(data, lo, hi)
            if flag:
                bad[i] = flag
                continue
        if s <= 0:
            continue
        scale = np.float32(target_sum / s)
        for t in range(n_table):
            x = np.float32(t) * scale
            lx = np.float64(np.log1p(x))
            xd = np.float64(x)
            table[t, 0] = xd
            table[t, 1] = xd * xd
            table[t, 2] = lx
            table[t, 3] = lx * lx
        if whole:  # the common case: table lookups only
            for j in range(lo, hi):
                c = col_map[indices[j]]
                if c >= 0:
                    t = slot[j - lo]
                    acc[c, 0] += table[t, 0]
                    acc[c, 1] += table[t, 1]
                    acc[c, 2] += table[t, 2]
                    acc[c, 3] += table[t, 3]
            continue
        for j in range(lo, hi):
            c = col_map[indices[j]]
            if c < 0:
                continue
            v = data[j]
            t = slot[j - lo]
            if t >= 0 and np.float32(t) == v:
                acc[c, 0] += table[t, 0]
                acc[c, 1] += table[t, 1]
                acc[c, 2] += table[t, 2]
                acc[c, 3] += table[t, 3]
            else:
                x = np.float32(v) * scale
                lx = np.float64(np.log1p(x))
                xd = np.float64(x)
                acc[c, 0] += xd
                acc[c, 1] += xd * xd
                acc[c, 2] += lx
                acc[c, 3] += lx * lx
    n_bad = 0
    for i in range(n):
        n_bad += bad[i] != 0
    return n_bad
