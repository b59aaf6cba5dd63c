"""The coreset's obs rows are read column by column; they must equal the rows of the whole obs frame."""

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

N = 120


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "cat": pd.Categorical(rng.choice(["x", "y", None], N), categories=["y", "x"]),
            "ordered": pd.Categorical(rng.choice(["lo", "hi"], N), categories=["lo", "hi"], ordered=True),
            "num": rng.normal(size=N),
            "count": rng.integers(0, 9, N),
            "flag": rng.random(N) > 0.5,
            "text": np.array([f"t{i}" for i in range(N)], dtype=object),
            "nint": pd.array(np.where(rng.random(N) > 0.8, None, rng.integers(0, 5, N)), dtype="Int64"),
        },
        index=[f"cell{i}" for i in range(N)],
    )
    a = ad.AnnData(sp.random(N, 10, density=0.3, format="csr", dtype=np.float32), obs=h5ad_safe_strings(obs))
    a.var_names = [f"g{i}" for i in range(10)]
    p = tmp_path_factory.mktemp("obs") / "obs.h5ad"
    a.write_h5ad(p)
    return p


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_rows_equal_the_whole_frame(path, data):
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, N - 1), min_size=1, max_size=40))))
    src = as_sources([path])[0]
    try:
        got = src.read_obs(rows)
    finally:
        src.close()
    want = ad.read_h5ad(path).obs.iloc[rows]
    assert list(got.index) == list(want.index)
    assert list(got.columns) == list(want.columns)
    for col in want.columns:
        assert got[col].dtype == want[col].dtype, col
        pd.testing.assert_series_equal(got[col], want[col], check_index=False, check_names=False)


def test_categories_stored_as_nullable_strings(tmp_path):
    """anndata 0.11 stores a string column as a categorical whose categories are a nullable-string group."""
    import h5py

    import sccoreset as scc

    a = ad.AnnData(sp.random(5, 3, density=0.5, format="csr", dtype=np.float32, random_state=0))
    a.X.data[:] = 1.0
    a.var_names = ["g0", "g1", "g2"]
    a.obs_names = [f"c{i}" for i in range(5)]
    a.obs["label"] = pd.Categorical(["a", None, "b", "c", None], categories=["a", "b", "c"])
    p = tmp_path / "ns.h5ad"
    a.write_h5ad(p)
    with h5py.File(p, "r+") as f:
        del f["obs/label/categories"]
        g = f["obs/label"].create_group("categories")
        g.attrs.update({"encoding-type": "nullable-string-array", "encoding-version": "0.1.0"})
        g.create_dataset("values", data=np.array([b"a", b"b", b"c"], dtype=object), dtype=h5py.string_dtype())
        g.create_dataset("mask", data=np.zeros(3, bool))
    with pytest.warns(scc.MissingLabelsWarning, match="2 cells with a missing label"):
        info = scc.pp.scan([p], "label")
    assert info.labels == ["a", "b", "c"] and info.n_missing.tolist() == [2]
    src = as_sources([p])[0]
    try:
        assert src.read_obs(np.array([0, 2]))["label"].astype(str).tolist() == ["a", "b"]
    finally:
        src.close()
