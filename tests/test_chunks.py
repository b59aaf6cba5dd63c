from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset.pp._chunk_plan import plan_chunks


@settings(max_examples=200, deadline=None)
@given(
    n_obs=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    chunk_size=st.integers(1, 50),
    order=st.sampled_from(["sequential", "block_shuffle"]),
    block_size=st.integers(1, 20),
    seed=st.integers(0, 100),
)
def test_plan_reads_every_row_exactly_once(n_obs, chunk_size, order, block_size, seed):
    plan = plan_chunks(n_obs, chunk_size, order=order, block_size=block_size, rng=np.random.default_rng(seed))
    seen = [(f, r) for chunk in plan for f, start, stop in chunk for r in range(start, stop)]
    assert sorted(seen) == [(f, r) for f, n in enumerate(n_obs) for r in range(n)]
    sizes = [sum(stop - start for _, start, stop in chunk) for chunk in plan]
    assert all(s == chunk_size for s in sizes[:-1])
    assert not sizes or 0 < sizes[-1] <= chunk_size
    if order == "sequential":
        assert seen == sorted(seen)
    for chunk in plan:  # one read per contiguous run, in sorted order
        assert chunk == sorted(chunk)
        assert all(a[0] != b[0] or a[2] < b[1] for a, b in zip(chunk, chunk[1:], strict=False))


def test_plan_is_seeded():
    a = plan_chunks([100, 50], 30, order="block_shuffle", block_size=5, rng=np.random.default_rng(1))
    b = plan_chunks([100, 50], 30, order="block_shuffle", block_size=5, rng=np.random.default_rng(1))
    c = plan_chunks([100, 50], 30, order="block_shuffle", block_size=5, rng=np.random.default_rng(2))
    assert a == b != c


@pytest.mark.parametrize("order", ["sequential", "block_shuffle"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_iter_chunks_features_labels_provenance(small_stream, small_gene_space, order, prefetch):
    files = small_stream.files
    adatas = [ad.read_h5ad(f) for f in files]
    seen = set()
    for chunk in scc.pp.iter_chunks(
        files, small_gene_space, chunk_size=170, label_key="cell_type", order=order, prefetch=prefetch, block_size=16
    ):
        assert len(chunk) <= 170 and chunk.X.dtype == np.float32
        for f in np.unique(chunk.file_index):
            sel = chunk.file_index == f
            a = adatas[f]
            rows = chunk.row[sel]
            np.testing.assert_array_equal(chunk.obs_names[sel], a.obs_names[rows])
            np.testing.assert_array_equal(chunk.labels[sel], a.obs["cell_type"].astype(str).to_numpy()[rows])
            expected = small_gene_space.transform(a.X[rows], a.var_names)
            np.testing.assert_array_equal(chunk.X[sel], expected)
            seen.update((int(f), int(r)) for r in rows)
        assert chunk.files == [str(f) for f in files]
    assert len(seen) == sum(a.n_obs for a in adatas)


def test_block_shuffle_mixes_files(small_stream, small_gene_space):
    chunks = list(scc.pp.iter_chunks(small_stream.files, small_gene_space, chunk_size=300, order="block_shuffle"))
    assert all(len(np.unique(c.file_index)) > 1 for c in chunks)
    seq = list(scc.pp.iter_chunks(small_stream.files, small_gene_space, chunk_size=300))
    assert all(len(np.unique(c.file_index)) == 1 for c in seq)


def test_inputs_in_memory_backed_and_mudata(tmp_path, small_stream, small_gene_space):
    path = small_stream.files[0]
    mem = ad.read_h5ad(path)
    expected = small_gene_space.transform(mem.X, mem.var_names)

    def features(files, **kw):
        return np.concatenate([c.X for c in scc.pp.iter_chunks(files, small_gene_space, chunk_size=100, **kw)])

    np.testing.assert_array_equal(features([path]), expected)
    np.testing.assert_array_equal(features([mem]), expected)
    np.testing.assert_array_equal(features([ad.read_h5ad(path, backed="r")]), expected)
    mdata = md.MuData({"rna": mem})
    mdata.write(tmp_path / "x.h5mu")
    np.testing.assert_array_equal(features([tmp_path / "x.h5mu"], mod="rna"), expected)
    np.testing.assert_array_equal(features([mdata], mod="rna"), expected)
    dense = mem.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    np.testing.assert_array_equal(features([tmp_path / "dense.h5ad"]), expected)


def test_scan_reads_labels_and_genes(small_stream):
    info = scc.pp.scan(small_stream.files, "cell_type")
    adatas = [ad.read_h5ad(f) for f in small_stream.files]
    assert list(info.n_obs) == [a.n_obs for a in adatas]
    assert set(info.genes) == set().union(*[set(a.var_names) for a in adatas])
    for f, a in zip(info.files, adatas, strict=True):
        vc = a.obs["cell_type"].value_counts()
        for lab, n in vc.items():
            assert info.label_counts.loc[f, lab] == n
    assert info.n_cells == sum(a.n_obs for a in adatas)
    assert list(info.summary().columns) == ["n_obs", "n_genes", "n_labels"]


def test_early_close_stops_background_thread(small_stream, small_gene_space):
    import threading

    it = scc.pp.iter_chunks(small_stream.files, small_gene_space, chunk_size=50, prefetch=2)
    next(it)
    it.close()
    assert not any(t.name == "sccoreset-prefetch" for t in threading.enumerate())


@settings(max_examples=40, deadline=None)
@given(
    splits=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    chunk_size=st.integers(1, 60),
    order=st.sampled_from(["sequential", "block_shuffle"]),
    block_size=st.integers(1, 16),
    seed=st.integers(0, 1000),
)
def test_any_split_and_chunk_size_reads_every_row_once(splits, chunk_size, order, block_size, seed):
    """Cells split over files in any way are read exactly once, each with its own features."""
    from .conftest import random_counts

    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(20)]
    full = random_counts(rng, sum(splits), genes, density=0.4)
    full.obs_names = [f"cell{i}" for i in range(full.n_obs)]
    bounds = np.cumsum([0, *splits])
    files = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = full[lo:hi].copy()
        cols = rng.permutation(20)[: rng.integers(12, 21)]  # each file its own subset and order of genes
        files.append(part[:, cols].copy())
    gs = scc.pp.GeneSpace(genes=np.array(genes[:10]), mean=rng.random(10), std=rng.random(10) + 0.5)
    seen = []
    for chunk in scc.pp.iter_chunks(files, gs, chunk_size=chunk_size, order=order, block_size=block_size,
                                    random_state=seed, prefetch=1):  # fmt: skip
        assert 0 < len(chunk) <= chunk_size
        for i in range(len(chunk)):
            f, r = int(chunk.file_index[i]), int(chunk.row[i])
            src = files[f]
            np.testing.assert_array_equal(chunk.X[i], gs.transform(src.X[r : r + 1], src.var_names)[0])
            seen.append(chunk.obs_names[i])
    assert sorted(seen) == sorted(full.obs_names)


@pytest.mark.parametrize("layout", ["gzip", "contiguous", "chunked"])
def test_every_storage_layout_reads_the_same(tmp_path, small_stream, small_gene_space, layout):
    """Uncompressed X is read with positioned reads, compressed X through h5py: same features either way."""
    import h5py

    src = ad.read_h5ad(small_stream.files[0])
    path = tmp_path / f"{layout}.h5ad"
    src.write_h5ad(path, compression="gzip" if layout == "gzip" else None)
    if layout == "contiguous":
        with h5py.File(path, "r+") as f:
            for key in ("data", "indices"):
                values = f["X"][key][:]
                del f["X"][key]
                f["X"].create_dataset(key, data=values, chunks=None)
    from sccoreset._io._direct import DirectDataset

    with h5py.File(path) as f:
        assert DirectDataset(f["X/data"]).usable == (layout != "gzip")
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([path], small_gene_space, chunk_size=70)])
    np.testing.assert_array_equal(got, small_gene_space.transform(src.X, src.var_names))


@settings(max_examples=200, deadline=None)
@given(
    lists=st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=8), min_size=1, max_size=4),
    picks=st.lists(st.integers(0, 3), min_size=1, max_size=8),
)
def test_gene_union_is_the_ordered_union_of_shared_and_distinct_lists(lists, picks):
    """Files sharing one Index object (as files with the same genes do) are merged once; order of first appearance."""
    import pandas as pd

    from sccoreset.pp._scan import gene_union

    indexes = [pd.Index(names, dtype=object) for names in lists]
    sources = [type("S", (), {"var_names": indexes[p % len(indexes)]})() for p in picks]
    expected = list(dict.fromkeys(g for s in sources for g in s.var_names))
    assert list(gene_union(sources)) == expected
