"""Reading the kept cells' rows back by provenance (the coreset's counts): any sorted set of file rows."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sccoreset._errors import InputError
from sccoreset._io import _source
from sccoreset._io._sources import as_sources
from sccoreset._utils import h5ad_safe_strings

N_OBS, N_GENES = 300, 40


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(1)
    X = sp.random(N_OBS, N_GENES, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 10).astype(np.float32)
    X = sp.diags((np.arange(N_OBS) % 50 != 7).astype(np.float32)) @ X  # empty rows (7, 57, ...) come back empty
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    a = ad.AnnData(
        X=X,
        obs=h5ad_safe_strings(pd.DataFrame(index=[f"c{i}" for i in range(N_OBS)])),
        var=h5ad_safe_strings(pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])),
    )
    path = tmp_path_factory.mktemp("rows") / "a.h5ad"
    a.write_h5ad(path)
    (src,) = as_sources([path])
    yield X, src
    src.close()


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, N_OBS - 1), min_size=1, max_size=N_OBS), st.sampled_from([1 << 20, 5]))
def test_any_sorted_rows_read_back_exactly(stored, rows, pointer_span):
    """Any sorted row set, with indptr read once for the span or once per run (``POINTER_SPAN``)."""
    X, src = stored
    rows = np.array(sorted(rows), dtype=np.int64)
    _source.POINTER_SPAN = pointer_span
    try:
        block = src.read_rows_at(rows)
    finally:
        _source.POINTER_SPAN = 1 << 20
    got = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(rows.size, N_GENES))
    np.testing.assert_array_equal(got.toarray(), X[rows].toarray())


def test_scattered_rows_take_the_positioned_read_path(stored):
    X, src = stored
    rows = np.array([0, 1, 2, 50, 120, 121, 299])
    assert src._read_runs_direct([(0, 3), (50, 51), (120, 122), (299, 300)]) is not None
    block = src.read_rows_at(rows)
    np.testing.assert_array_equal(
        sp.csr_matrix((block.data, block.indices, block.indptr), shape=(rows.size, N_GENES)).toarray(),
        X[rows].toarray(),
    )


def test_a_truncated_indptr_is_an_error_naming_the_file(tmp_path, stored):
    X, _ = stored
    a = ad.AnnData(X=X)
    path = tmp_path / "short.h5ad"
    a.write_h5ad(path)
    (src,) = as_sources([path])
    with h5py.File(path, "r+") as f:  # the file loses the pointers of its last 100 rows after it was opened
        ptr = f["X/indptr"][: N_OBS - 99]
        del f["X/indptr"]
        f["X/indptr"] = ptr
    with pytest.raises(InputError, match=r"short\.h5ad.*(truncated|indptr)"):
        src.read_rows_at(np.array([3, 10, 250, 260]))
    src.close()


@settings(max_examples=80, deadline=None)
@given(st.integers(0, N_OBS), st.integers(0, N_OBS), st.sampled_from([1, 3, 17, 100, 1 << 17]))
def test_row_blocks_cover_any_range_exactly(stored, a, b, block_nnz):
    """``iter_row_blocks`` hands out consecutive blocks that together are exactly rows ``[start, stop)``."""
    from sccoreset._io._blocks import ReadBuffers

    X, src = stored
    start, stop = min(a, b), max(a, b)
    got, pos = [], 0
    for r0, block in src.iter_row_blocks(start, stop, ReadBuffers(), block_nnz):
        assert r0 == pos and block.n_rows >= 1
        # at most block_nnz values, or a single row
        assert block.indptr[-1] <= block_nnz or block.n_rows == 1
        got.append(
            sp.csr_matrix((block.data.copy(), block.indices.copy(), block.indptr.copy()), (block.n_rows, N_GENES))
        )
        pos += block.n_rows
    assert pos == stop - start
    if got:
        np.testing.assert_array_equal(sp.vstack(got).toarray(), X[start:stop].toarray())
