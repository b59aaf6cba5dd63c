"""Reading with several threads (issue 9): same chunks in the same order, bounded, stoppable; fit_gene_space alike."""

from __future__ import annotations

import threading
import time
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _kernel_reference import row_statistics
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset._errors import InputError
from sccoreset._io._parallel import default_workers, ordered_map
from sccoreset._io._recycle import ArrayRecycler
from sccoreset._io._sources import open_sources
from sccoreset._utils import h5ad_safe_strings
from sccoreset.pp._chunks import ChunkReader
from sccoreset.pp._fit import accumulate_statistics
from sccoreset.pp._scan import gene_union

N_GENES = 50


def _counts(seed: int, n_obs: int, missing: bool = False, genes: list[str] | None = None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = genes or [f"g{i}" for i in range(N_GENES)]
    X = sp.random(n_obs, len(genes), density=0.3, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X.data[::17] += 0.0  # keep whole counts
    labels = rng.choice(["a", "b", "c"], n_obs).astype(object)
    if missing:
        labels[rng.random(n_obs) < 0.1] = None
    obs = pd.DataFrame(
        {"label": pd.Categorical(labels, categories=["a", "b", "c"])}, index=[f"s{seed}_{i}" for i in range(n_obs)]
    )
    return ad.AnnData(X=X, obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(pd.DataFrame(index=genes)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    paths = []
    shuffled = [f"g{i}" for i in np.random.default_rng(9).permutation(N_GENES)]
    for k, n in enumerate([230, 75, 310, 1, 140]):
        a = _counts(k, n, missing=k % 2 == 0, genes=shuffled if k == 3 else None)
        p = d / f"f{k}.h5ad"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.write_h5ad(p)
        paths.append(p)
    gs = scc.pp.fit_gene_space(paths, n_top_genes=30)
    return paths, gs


def _chunks(paths, gs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            (c.index, c.X.copy(), c.labels, c.file_index, c.row, c.obs_names, c.n_skipped)
            for c in scc.pp.iter_chunks(paths, gs, label_key="label", **kw)
        ]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0] and x[6] == y[6]
        np.testing.assert_array_equal(x[1], y[1])
        for u, v in zip(x[2:6], y[2:6], strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("order", ["sequential", "block_shuffle"])
@pytest.mark.parametrize("chunk_size", [64, 333])
def test_parallel_chunks_equal_sequential(files, order, chunk_size):
    paths, gs = files
    kw = {"chunk_size": chunk_size, "order": order, "block_size": 16}
    ref = _chunks(paths, gs, prefetch=0, **kw)
    assert [c[0] for c in ref] == sorted(c[0] for c in ref)
    for n_workers in (1, 2, 3, 8):
        for prefetch in (1, 3):
            _assert_same(_chunks(paths, gs, n_workers=n_workers, prefetch=prefetch, **kw), ref)


@pytest.mark.parametrize("block_nnz", [1, 7, 200])
def test_reading_in_small_blocks_gives_the_same_chunks(files, monkeypatch, block_nnz):
    """Chunks read and transformed a block of rows at a time (prefetch=0, n_workers>1) equal the whole-segment
    path (n_workers=1), whatever the block size; files with cells missing a label included."""
    from sccoreset._io import _source

    paths, gs = files
    kw = {"chunk_size": 97, "order": "block_shuffle", "block_size": 40}
    ref = _chunks(paths, gs, n_workers=1, **kw)
    monkeypatch.setattr(_source, "SUB_BLOCK_NNZ", block_nnz)
    _assert_same(_chunks(paths, gs, prefetch=0, **kw), ref)
    _assert_same(_chunks(paths, gs, n_workers=3, **kw), ref)


def test_parallel_reads_views_of_backed_data(files):
    paths, gs = files
    backed = ad.read_h5ad(paths[2], backed="r")
    views = [backed[[5, 6, 7, 100, 101, 2, 300]], backed[40:200], ad.read_h5ad(paths[0])[::3]]
    ref = _chunks(views, gs, chunk_size=50, prefetch=0)
    for n_workers in (2, 4):
        _assert_same(_chunks(views, gs, chunk_size=50, n_workers=n_workers), ref)
    backed.file.close()


def test_order_is_kept_when_early_chunks_are_slow(files, monkeypatch):
    paths, gs = files
    slow = ChunkReader.read_raw

    def read_raw(self, index, segments, buffers):
        if index % 3 == 0:
            time.sleep(0.05)  # later chunks finish first
        return slow(self, index, segments, buffers)

    monkeypatch.setattr(ChunkReader, "read_raw", read_raw)
    got = [c.index for c in scc.pp.iter_chunks(paths, gs, chunk_size=40, n_workers=4, prefetch=2)]
    assert got == list(range(len(got)))


def _reader_threads() -> int:
    return sum(t.name.startswith("sccoreset-") for t in threading.enumerate())


def test_early_close_stops_the_threads(files):
    paths, gs = files
    baseline = threading.active_count()
    it = scc.pp.iter_chunks(paths, gs, chunk_size=20, n_workers=4, prefetch=2)
    next(it)
    next(it)
    assert threading.active_count() > baseline
    it.close()
    assert threading.active_count() == baseline and _reader_threads() == 0
    # a reader iterate()d and dropped half-way, as the trainer does
    with open_sources(paths) as sources:
        reader = ChunkReader(sources, gs, n_workers=3)
        plan = [[(0, s, min(s + 10, 230))] for s in range(0, 230, 10)]
        for i, _ in enumerate(reader.iterate(plan, prefetch=1)):
            if i == 2:
                break
    assert threading.active_count() == baseline


def test_bounded_in_flight(files):
    """At most prefetch + n_workers items are taken before the consumer takes the first."""
    started = []
    gate = threading.Event()

    def work(i, _):
        started.append(i)
        gate.wait()
        return i

    it = ordered_map(work, range(50), n_workers=3, depth=2)
    out = []
    t = threading.Thread(target=lambda: out.append(next(it)))
    t.start()
    time.sleep(0.3)
    assert len(started) == 3  # each worker holds one item, blocked
    gate.set()
    t.join()
    time.sleep(0.2)
    assert out == [0] and len(started) <= 1 + 2 + 3  # the consumer's item, then at most depth + n_workers
    assert list(it) == list(range(1, 50))


def test_worker_exception_surfaces_at_its_chunk_naming_the_file(files, tmp_path):
    paths, gs = files
    bad = tmp_path / "bad.h5ad"
    _counts(7, 120).write_h5ad(bad)
    with h5py.File(bad, "r+") as f:
        f["X/indices"][int(f["X/indptr"][90])] = 10_000
    stream = [paths[0], bad, paths[2]]
    for n_workers in (1, 2, 4):
        got = []

        def consume(n_workers=n_workers, got=got):
            for c in scc.pp.iter_chunks(stream, gs, chunk_size=50, n_workers=n_workers, prefetch=2):
                got.append(c.index)

        with pytest.raises(InputError, match=r"bad\.h5ad: X/indices out of range.*row 90"):
            consume()
        assert got == list(range((230 + 90) // 50))  # every chunk before the bad one, in order
        assert _reader_threads() == 0
    with pytest.raises(InputError, match=r"bad\.h5ad: X/indices out of range.*row 90"):
        scc.pp.fit_gene_space(stream, n_top_genes=10)
    assert _reader_threads() == 0


def test_pin_memory_without_cuda_gives_plain_arrays(files):
    paths, gs = files
    chunks = list(scc.pp.iter_chunks(paths, gs, chunk_size=100, n_workers=2, pin_memory=True))
    assert all(c.X.dtype == np.float32 and c.X.flags.c_contiguous for c in chunks)
    rec = ArrayRecycler(pin_memory=True)
    a = rec.empty((4, 3))
    assert a.shape == (4, 3) and a.dtype == np.float32
    import torch

    assert rec.pinned == torch.cuda.is_available()
    del a
    b = rec.empty((4, 3))
    assert rec.empty((4, 3)) is not b  # b is held: not handed out twice


def test_default_workers_is_capped():
    assert 1 <= default_workers() <= 8
    with pytest.raises(InputError, match="n_workers"):
        ChunkReader([], None, n_workers=0)


# -- fit_gene_space ------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(n_workers=st.integers(1, 6), max_cells=st.sampled_from([None, 200]), seed=st.integers(0, 3))
def test_fit_statistics_do_not_depend_on_workers(files, n_workers, max_cells, seed):
    paths, _ = files
    with open_sources(paths) as sources:
        genes = gene_union(sources)
        kw = {"target_sum": 1e4, "max_cells": max_cells, "random_state": seed}
        ref, n_ref = accumulate_statistics(sources, genes, n_workers=1, **kw)
        got, n = accumulate_statistics(sources, genes, n_workers=n_workers, **kw)
    assert n == n_ref
    np.testing.assert_array_equal(got, ref)


def _reference_sums(paths, genes, target_sum=1e4):
    """Float64 numpy sums over every cell: what the kernel computes, elementwise in float32 like it."""
    sums = np.zeros((4, len(genes)))
    for p in paths:
        a = ad.read_h5ad(p)
        X = a.X.tocsr()
        col = genes.get_indexer(a.var_names)
        for i in range(X.shape[0]):
            lo, hi = X.indptr[i], X.indptr[i + 1]
            stats = row_statistics(X.data[lo:hi], target_sum)
            if stats is None:
                continue
            c = col[X.indices[lo:hi]]
            for k in range(4):
                np.add.at(sums[k], c, stats[k])
    return sums


def test_fit_statistics_match_a_plain_reference(files):
    paths, _ = files
    with open_sources(paths) as sources:
        genes = gene_union(sources)
        got, n = accumulate_statistics(sources, genes, target_sum=1e4, n_workers=3)
    assert n == 230 + 75 + 310 + 1 + 140
    np.testing.assert_allclose(got, _reference_sums(paths, genes), rtol=1e-6, atol=1e-9)


def test_fit_gene_space_same_genes_whatever_the_workers(files):
    paths, _ = files
    spaces = [scc.pp.fit_gene_space(paths, n_top_genes=20, n_workers=n) for n in (1, 2, 5)]
    for gs in spaces[1:]:
        np.testing.assert_array_equal(gs.genes, spaces[0].genes)
        np.testing.assert_allclose(gs.mean, spaces[0].mean, rtol=1e-6)
        np.testing.assert_allclose(gs.std, spaces[0].std, rtol=1e-6)


def test_counts_check_reads_each_file_once(files, monkeypatch):
    """The counts check uses the first rows read when the file was opened, not a second open."""
    paths, _ = files
    from sccoreset._io import _checks

    with open_sources(paths) as sources:
        assert all(s.peeked for s in sources)
        monkeypatch.setattr(type(sources[0]), "read_rows", lambda *a, **k: pytest.fail("file reopened"))
        _checks.warn_if_not_counts(sources)


def test_categorical_labels_are_read_once_per_file(files):
    paths, _ = files
    with open_sources(paths[:1]) as sources:
        src = sources[0]
        values, missing = src.read_labels("label", 10, 60)
        assert "label" in src._categorical
        want = ad.read_h5ad(paths[0]).obs["label"].to_numpy()[10:60]
        assert [None if m else v for v, m in zip(values, missing, strict=True)] == [
            None if pd.isna(w) else w for w in want
        ]


@pytest.mark.parametrize("storage", ["gzip", "zarr", "plain"])
def test_read_buffers_stay_one_segment_large(files, tmp_path, storage):
    """Chunk after chunk, a thread's read buffers hold one segment, whatever the storage (h5py, zarr, positioned
    reads): they must not grow with the stream."""
    from sccoreset._io._blocks import ReadBuffers

    paths, gs = files
    a = ad.read_h5ad(paths[1])  # 75 cells, every one labelled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if storage == "zarr":
            pytest.importorskip("zarr")
            path = tmp_path / "c.zarr"
            a.write_zarr(path)
        else:
            path = tmp_path / "c.h5ad"
            a.write_h5ad(path, compression="gzip" if storage == "gzip" else None)
    nnz = np.diff(a.X.indptr)
    buffers = ReadBuffers()
    with open_sources([path]) as sources:
        reader = ChunkReader(sources, gs, "label")
        for k in range(60):  # 60 chunks of 5 rows each, read again and again
            lo = (5 * k) % 70
            reader.read_transformed(k, [(0, lo, lo + 5)], buffers)
    biggest = max(nnz[lo : lo + 5].sum() for lo in range(0, 71))
    assert all(arr.size <= 2 * biggest + 1024 for arr in buffers._arrays.values())
