"""Numba kernels on CSR row blocks: the hot path of reading a stream.

They release the GIL, so a background thread can transform the next chunk while
the main thread trains.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True)
def csr_transform(data, indices, indptr, col_map, mean, inv_std, fill, target_sum, max_value, out, bad):
    """normalize_total -> log1p -> map columns -> (x - mean) * inv_std -> clip, into dense ``out``.

    ``fill[c]`` is the (clipped) value of a zero in target column ``c``. ``bad[i]`` is set to 1 for a
    row holding a negative or non-finite value.
    """
    n = indptr.size - 1
    g = out.shape[1]
    for i in numba.prange(n):
        lo = indptr[i]
        hi = indptr[i + 1]
        s = 0.0
        flag = 0
        for j in range(lo, hi):
            v = data[j]
            if not (v >= 0.0) or v == np.inf:
                flag = 1
            s += v
        bad[i] = flag
        scale = target_sum / s if s > 0 else 0.0
        for c in range(g):
            out[i, c] = fill[c]
        for j in range(lo, hi):
            c = col_map[indices[j]]
            if c >= 0:
                v = (math.log1p(data[j] * scale) - mean[c]) * inv_std[c]
                if v > max_value:
                    v = max_value
                elif v < -max_value:
                    v = -max_value
                out[i, c] = v


@numba.njit(nogil=True, cache=True)
def csr_accumulate(data, indices, indptr, col_map, target_sum, sums, bad):
    """Add per-column sums of x, x**2, log1p(x), log1p(x)**2 of normalized rows into ``sums`` (4, n_genes).

    ``col_map`` maps the block's columns onto the target genes (-1: not a target). Returns the number of rows
    holding a negative or non-finite value (they are flagged in ``bad``).
    """
    n = indptr.size - 1
    n_bad = 0
    for i in range(n):
        lo = indptr[i]
        hi = indptr[i + 1]
        s = 0.0
        flag = 0
        for j in range(lo, hi):
            v = data[j]
            if not (v >= 0.0) or v == np.inf:
                flag = 1
            s += v
        bad[i] = flag
        n_bad += flag
        if flag or s <= 0:
            continue
        scale = target_sum / s
        for j in range(lo, hi):
            c = col_map[indices[j]]
            if c < 0:
                continue
            x = data[j] * scale
            lx = math.log1p(x)
            sums[0, c] += x
            sums[1, c] += x * x
            sums[2, c] += lx
            sums[3, c] += lx * lx
    return n_bad
