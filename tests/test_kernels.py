"""The reading kernels (gene statistics, transform) equal plain per-element references on any rows, bad ones included."""

from __future__ import annotations

import numpy as np
from _kernel_reference import row_scale, row_statistics
from hypothesis import given, settings
from hypothesis import strategies as st

from sccoreset._io._kernels import BAD_INDEX, BAD_VALUE, csr_accumulate, csr_transform, csr_transform_serial

N_COLS = 12
values = st.one_of(
    st.integers(0, 5).map(float),  # small whole counts: the table path
    st.integers(60, 300).map(float),  # whole, beyond the table
    st.floats(0.01, 50.0, allow_nan=False),  # fractional (corrected counts)
    st.sampled_from([-1.0, float("nan"), float("inf")]),  # a flagged row
)
rows = st.lists(st.lists(st.tuples(st.integers(-1, N_COLS), values), max_size=N_COLS + 3), min_size=1, max_size=12)
# column indices as stored: int32, or int64 with some beyond 2**32 (in range once truncated to 32 bits, so a
# kernel that compared only the low half would take them for valid columns)
index_dtypes = st.sampled_from(["int32", "int64", "int64-huge"])


def _csr(row_list, index_dtype="int32"):
    # stored rows: the column indices unique within a row, as CSR requires
    row_list = [list({i: (i, x) for i, x in row}.values()) for row in row_list]
    if index_dtype == "int64-huge":  # index N_COLS (out of range) stored as 2**32 + 1: column 1 in 32 bits
        row_list = [[(2**32 + 1 if i == N_COLS else i, x) for i, x in row] for row in row_list]
    data = np.array([x for row in row_list for _, x in row], dtype=np.float32)
    indices = np.array([i for row in row_list for i, _ in row], dtype=np.int32 if index_dtype == "int32" else np.int64)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in row_list])]).astype(np.int64)
    return row_list, data, indices, indptr


def _reference(row_list, col_map, target_sum):
    sums = np.zeros((N_COLS, 4))
    flags = []
    for row in row_list:
        idx = np.array([i for i, _ in row], dtype=np.int64)
        v = np.array([x for _, x in row], dtype=np.float32)
        if ((idx < 0) | (idx >= N_COLS)).any():
            flags.append(BAD_INDEX)
            continue
        if (~np.isfinite(v) | (v < 0)).any():
            flags.append(BAD_VALUE)
            continue
        flags.append(0)
        stats = row_statistics(v, target_sum)
        if stats is None:
            continue
        for c, stat in zip(col_map[idx], stats.T, strict=True):
            if c >= 0:
                sums[c] += stat
    return sums, np.array(flags, dtype=np.uint8)


@settings(max_examples=200, deadline=None)
@given(row_list=rows, dropped=st.sets(st.integers(0, N_COLS - 1), max_size=4), index_dtype=index_dtypes)
def test_accumulate_matches_reference(row_list, dropped, index_dtype):
    col_map = np.array([-1 if c in dropped else c for c in range(N_COLS)], dtype=np.int32)
    row_list, data, indices, indptr = _csr(row_list, index_dtype)
    acc = np.zeros((N_COLS, 4))
    bad = np.full(len(row_list), 99, dtype=np.uint8)  # stale flags are overwritten
    n_bad = csr_accumulate(data, indices, indptr, col_map, 1e4, acc, bad)
    want, flags = _reference(row_list, col_map, 1e4)
    np.testing.assert_array_equal(bad, flags)
    assert n_bad == int((flags != 0).sum())
    # numba and numpy round float32 log1p differently in the last bit: the existing reference test tolerance
    np.testing.assert_allclose(acc, want, rtol=1e-6, atol=0)


def _transform_reference(row_list, col_map, mean, inv_std, fill, target_sum, max_value):
    """normalize_total -> log1p -> gene list -> scale -> clip, one element at a time; bad rows stay at fill."""
    n_out = mean.size
    out = np.tile(fill, (len(row_list), 1))
    flags = []
    for r, row in enumerate(row_list):
        idx = np.array([i for i, _ in row], dtype=np.int64)
        v = np.array([x for _, x in row], dtype=np.float32)
        if ((idx < 0) | (idx >= N_COLS)).any():
            flags.append(BAD_INDEX)
            continue
        flags.append(BAD_VALUE if (~np.isfinite(v) | (v < 0)).any() else 0)
        if flags[-1]:
            continue
        scale = row_scale(v, target_sum)
        for c, x in zip(col_map[idx], v, strict=True):
            if 0 <= c < n_out:
                z = (np.log1p(np.float32(x) * scale) - mean[c]) * inv_std[c]
                out[r, c] = min(max(z, -max_value), max_value)
    return out, np.array(flags, dtype=np.uint8)


@settings(max_examples=200, deadline=None)
@given(
    row_list=rows,
    dropped=st.sets(st.integers(0, N_COLS - 1), max_size=6),
    serial=st.booleans(),
    index_dtype=index_dtypes,
)
def test_transform_matches_reference(row_list, dropped, serial, index_dtype):
    kept = [c for c in range(N_COLS) if c not in dropped]
    col_map = np.full(N_COLS, -1, dtype=np.int32)
    col_map[kept] = np.arange(len(kept), dtype=np.int32)[::-1]  # the gene list in another order
    rng = np.random.default_rng(len(row_list))
    mean = rng.uniform(0, 2, len(kept)).astype(np.float32)
    inv_std = rng.uniform(0.5, 3, len(kept)).astype(np.float32)
    fill = np.clip(-mean * inv_std, -10, 10).astype(np.float32)
    row_list, data, indices, indptr = _csr(row_list, index_dtype)
    out = np.full((len(row_list), len(kept)), np.nan, dtype=np.float32)
    bad = np.full(len(row_list), 99, dtype=np.uint8)
    kernel = csr_transform_serial if serial else csr_transform
    kernel(data, indices, indptr, col_map, mean, inv_std, fill, np.float32(1e4), np.float32(10), out, bad)
    want, flags = _transform_reference(row_list, col_map, mean, inv_std, fill, 1e4, np.float32(10))
    np.testing.assert_array_equal(bad, flags)
    ok = flags == 0  # flagged rows: any content (the stream raises, naming the row)
    # numba's float32 log1p may differ from numpy's in the last bit
    np.testing.assert_allclose(out[ok], want[ok], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(out[flags == BAD_INDEX], want[flags == BAD_INDEX])


def test_transform_with_no_genes_flags_every_stored_entry():
    data = np.array([1.0, 2.0], np.float32)
    indices = np.array([0, 1], np.int32)
    indptr = np.array([0, 2, 2], np.int64)
    out = np.zeros((2, 0), np.float32)
    bad = np.zeros(2, np.uint8)
    empty = np.zeros(0, np.float32)
    csr_transform_serial(data, indices, indptr, np.zeros(0, np.int32), empty, empty, empty, np.float32(1e4),
                         np.float32(10), out, bad)  # fmt: skip
    assert bad.tolist() == [BAD_INDEX, 0]


def test_corrupt_indptr_asks_for_no_huge_scratch():
    """A row claiming 2**40 entries is flagged (bad indptr), not a MemoryError or a crash."""
    data = np.ones(4, np.float32)
    indices = np.arange(4, dtype=np.int32)
    indptr = np.array([0, 2, 2**40], np.int64)
    col_map = np.arange(N_COLS, dtype=np.int32)
    stats = np.ones(N_COLS, np.float32)
    for kernel in (csr_transform, csr_transform_serial):
        out = np.zeros((2, N_COLS), np.float32)
        bad = np.zeros(2, np.uint8)
        kernel(data, indices, indptr, col_map, stats, stats, stats, np.float32(1e4), np.float32(10), out, bad)
        assert bad.tolist() == [0, 4]
    acc = np.zeros((N_COLS, 4))
    bad = np.zeros(2, np.uint8)
    assert csr_accumulate(data, indices, indptr, col_map, 1e4, acc, bad) == 1
    assert bad.tolist() == [0, 4]


def test_transform_csr_refuses_an_out_array_it_would_overrun():
    """``GeneSpace.transform_csr`` checks ``out`` and ``col_map``: a wrong shape was a segfault, now an error."""
    import pytest

    from sccoreset.pp import GeneSpace

    gs = GeneSpace(genes=np.array(["a", "b", "c"]), mean=np.zeros(3), std=np.ones(3))
    data = np.ones(4, np.float32)
    indices = np.array([0, 1, 2, 0], np.int32)
    indptr = np.array([0, 2, 4], np.int64)
    col_map = np.arange(3, dtype=np.int32)
    good = gs.transform_csr(data, indices, indptr, col_map)
    assert good.shape == (2, 3)
    out = np.zeros((2, 3), np.float32)
    assert gs.transform_csr(data, indices, indptr, col_map, out=out) is out
    np.testing.assert_array_equal(out, good)
    for bad_out in (np.zeros((1, 3), np.float32), np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float64),
                    np.zeros((3, 2), np.float32).T, np.zeros((2, 3), np.float32).tolist()):  # fmt: skip
        with pytest.raises(ValueError, match="out must be"):
            gs.transform_csr(data, indices, indptr, col_map, out=bad_out)
    for bad_map in (np.array([0, 1, 3], np.int32), np.array([0, -2, 1], np.int32), np.zeros(3, np.float32)):
        with pytest.raises(ValueError, match="col_map"):
            gs.transform_csr(data, indices, indptr, bad_map)
