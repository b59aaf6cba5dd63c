"""Reading the kept cells' rows back by provenance (the coreset's counts): any sorted set of file rows."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sccoreset._io._sources import as_sources
from sccoreset._utils import h5ad_safe_strings

N_OBS, N_GENES = 300, 40


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(1)
    X = sp.random(N_OBS, N_GENES, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 10).astype(np.float32)
    X[7] = 0  # empty rows must come back empty
    X[8] = 0
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
@given(st.sets(st.integers(0, N_OBS - 1), min_size=1, max_size=N_OBS))
def test_any_sorted_rows_read_back_exactly(stored, rows):
    X, src = stored
    rows = np.array(sorted(rows), dtype=np.int64)
    block = src.read_rows_at(rows)
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
