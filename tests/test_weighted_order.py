"""order='weighted': scDataset-style weighted block sampling (per-cell balanced weights, blocks drawn with replacement)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset._io._sources import open_sources
from sccoreset._utils import h5ad_safe_strings
from sccoreset.pp._chunk_plan import _cut, _merge_sorted, plan_chunks
from sccoreset.pp._chunks import ChunkReader
from sccoreset.pp._weights import source_weights

# -- pp.balanced_weights ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 200), min_size=1, max_size=6),
    baseline=st.one_of(st.sampled_from([0.0, 1000.0]), st.floats(0, 5000)),
    seed=st.integers(0, 1000),
)
def test_balanced_weights_properties(counts, baseline, seed):
    names = [f"t{i}" for i in range(len(counts))]
    labels = np.repeat(names, counts)
    np.random.default_rng(seed).shuffle(labels)
    w = scc.pp.balanced_weights(labels, baseline=baseline)
    assert w.shape == labels.shape and w.dtype == np.float64
    assert np.isclose(w.sum(), 1.0) and (w > 0).all()
    shares = np.array([c / (c + baseline) for c in counts])
    shares /= shares.sum()
    for name, share in zip(names, shares, strict=True):
        sel = labels == name
        assert np.allclose(w[sel], w[sel][0], rtol=1e-12)  # equal within a combination
        assert np.isclose(w[sel].sum(), share)  # a combination's total: count / (count + baseline), normalised
    if baseline == 0:
        totals = [w[labels == n].sum() for n in names]
        assert np.allclose(totals, 1 / len(names))  # plain inverse frequency: equal totals


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=80),
    seed=st.integers(0, 1000),
    baseline=st.sampled_from([0.0, 3.0, 1000.0]),
)
def test_balanced_weights_over_combinations(lines, seed, baseline):
    drugs = np.random.default_rng(seed).choice(["d1", "d2"], len(lines))
    frame = pd.DataFrame({"line": lines, "drug": drugs})
    w = scc.pp.balanced_weights(frame, baseline=baseline)
    combo = frame["line"] + "|" + frame["drug"]
    counts = combo.value_counts()
    shares = counts / (counts + baseline)
    shares /= shares.sum()
    assert np.isclose(w.sum(), 1.0)
    for c in counts.index:
        sel = (combo == c).to_numpy()
        assert np.allclose(w[sel], w[sel][0])
        assert np.isclose(w[sel].sum(), shares[c])
    # the same weights as one key holding the combination
    assert np.allclose(w, scc.pp.balanced_weights(combo.to_numpy(), baseline=baseline))


# -- source_weights: per-cell weights of a stream, read from obs -------------------------------------------


def _file(tmp_path, name, labels, plates=None):
    n = len(labels)
    obs = pd.DataFrame({"label": pd.Categorical(labels)}, index=[f"{name}_{i}" for i in range(n)])
    if plates is not None:
        obs["plate"] = pd.Categorical(plates)
    a = ad.AnnData(sp.csr_matrix(np.ones((n, 3), dtype=np.float32)), obs=h5ad_safe_strings(obs))
    a.var_names = ["g0", "g1", "g2"]
    path = tmp_path / f"{name}.h5ad"
    a.write_h5ad(path)
    return path


def test_source_weights_match_balanced_weights_over_the_stream(tmp_path):
    rng = np.random.default_rng(0)
    labels = [rng.choice(["a", "b", "c"], n, p=[0.8, 0.15, 0.05]) for n in (50, 30, 20)]
    plates = [rng.choice(["p1", "p2"], len(lab)) for lab in labels]
    files = [_file(tmp_path, f"f{i}", lab, pl) for i, (lab, pl) in enumerate(zip(labels, plates, strict=True))]
    mem = ad.read_h5ad(files[2])  # an AnnData in memory reads the same
    all_labels, all_plates = np.concatenate(labels), np.concatenate(plates)
    with open_sources([files[0], files[1], mem]) as sources:
        w, n_missing = source_weights(sources, "label", baseline=10.0)
        w2, _ = source_weights(sources, ("label", "plate"), baseline=0.0)
    assert [x.size for x in w] == [50, 30, 20] and n_missing.tolist() == [0, 0, 0]
    np.testing.assert_allclose(np.concatenate(w), scc.pp.balanced_weights(all_labels, baseline=10.0))
    frame = pd.DataFrame({"label": all_labels, "plate": all_plates})
    np.testing.assert_allclose(np.concatenate(w2), scc.pp.balanced_weights(frame, baseline=0.0))


def test_source_weights_missing_values_weigh_zero_and_are_counted(tmp_path, caplog):
    labels = np.array(["a"] * 30 + ["b"] * 10, dtype=object)
    labels[[3, 4, 35]] = None
    path = _file(tmp_path, "gaps", pd.Categorical(labels, categories=["a", "b"]))
    other = _file(tmp_path, "full", ["a"] * 5 + ["b"] * 5)
    with open_sources([path, other]) as sources, caplog.at_level(logging.WARNING, logger="sccoreset"):
        w, n_missing = source_weights(sources, "label", baseline=0.0)
    assert n_missing.tolist() == [3, 0]
    assert (w[0][[3, 4, 35]] == 0).all() and (np.delete(w[0], [3, 4, 35]) > 0).all()
    kept = np.concatenate([np.delete(labels, [3, 4, 35]), ["a"] * 5 + ["b"] * 5])
    np.testing.assert_allclose(
        np.concatenate([np.delete(w[0], [3, 4, 35]), w[1]]), scc.pp.balanced_weights(kept, baseline=0)
    )
    assert "3 cells with a missing value" in caplog.text and "gaps" in caplog.text


def test_source_weights_absent_key_names_file_and_key(tmp_path):
    good = _file(tmp_path, "good", ["a", "b"], ["p", "p"])
    bad = _file(tmp_path, "lacks_plate", ["a", "b"])
    with open_sources([good, bad]) as sources, pytest.raises(scc.InputError, match=r"lacks_plate.*'plate'"):
        source_weights(sources, ("label", "plate"))


# -- the weighted block sampler ---------------------------------------------------------------------------


@st.composite
def _streams(draw):
    n_obs = draw(st.lists(st.integers(0, 60), min_size=1, max_size=5))
    weights = []
    for n in n_obs:
        w = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n)))
        weights.append(w)
    if not any(w.sum() > 0 for w in weights):
        n_obs = [*n_obs, 7]
        weights.append(np.ones(7))
    return n_obs, weights


@settings(max_examples=150, deadline=None)
@given(
    stream=_streams(),
    chunk_size=st.integers(1, 50),
    block_size=st.integers(1, 16),
    n_draws=st.one_of(st.none(), st.integers(1, 300)),
    seed=st.integers(0, 1000),
)
def test_weighted_plan_properties(stream, chunk_size, block_size, n_draws, seed):
    n_obs, weights = stream

    def plan(s):
        return plan_chunks(n_obs, chunk_size, order="weighted", block_size=block_size, rng=np.random.default_rng(s),
                           weights=weights, n_draws=n_draws)  # fmt: skip

    p = plan(seed)
    assert p == plan(seed)  # seeded
    sizes = [sum(stop - start for _, start, stop in chunk) for chunk in p]
    expected = sum(n_obs) if n_draws is None else n_draws
    assert sum(sizes) == expected  # every draw, and no more
    assert all(s == chunk_size for s in sizes[:-1]) and 0 < sizes[-1] <= chunk_size  # exact chunk sizes
    for chunk in p:
        assert chunk == sorted(chunk)  # read in (file, row) order
        for f, start, stop in chunk:
            assert 0 <= start < stop <= n_obs[f]  # within the file
            for b in range(start // block_size, (stop - 1) // block_size + 1):  # blocks of weight 0: never drawn
                assert weights[f][b * block_size : (b + 1) * block_size].sum() > 0


def test_weighted_draws_are_proportional_and_repeat_blocks():
    # two files, blocks of 4: block weights 1, 0, 3 in file 0 and 4 in file 1
    weights = [np.array([0.25] * 4 + [0] * 4 + [0.75] * 4), np.ones(4)]
    p = plan_chunks([12, 4], 100, order="weighted", block_size=4, rng=np.random.default_rng(3), weights=weights,
                    n_draws=4 * 8000)  # fmt: skip
    counts = {}
    for chunk in p:
        for f, start, stop in chunk:
            for r in range(start, stop):
                counts[(f, r // 4)] = counts.get((f, r // 4), 0) + 1
    assert (0, 1) not in counts
    freq = np.array([counts[(0, 0)], counts[(0, 2)], counts[(1, 0)]]) / (4 * 8000)
    np.testing.assert_allclose(freq, [1 / 8, 3 / 8, 4 / 8], atol=0.02)


def test_balanced_weights_even_out_an_imbalanced_label():
    # one file of 20,000 cells in runs of 40 of one class (as files sorted by type are): 90% / 9% / 1%
    rng = np.random.default_rng(0)
    runs = np.repeat(["a", "b", "c"], [450, 45, 5])
    labels = np.repeat(rng.permutation(runs), 40)
    file_share = np.array([(labels == c).mean() for c in "abc"])
    for baseline, bound in ((0.0, 0.12), (1000.0, None)):
        w = scc.pp.balanced_weights(labels, baseline=baseline)
        p = plan_chunks([labels.size], 1000, order="weighted", block_size=20, rng=np.random.default_rng(1),
                        weights=[w], n_draws=20_000)  # fmt: skip
        rows = np.concatenate([np.arange(s, e) for chunk in p for _, s, e in chunk])
        drawn = np.array([(labels[rows] == c).mean() for c in "abc"])
        # total variation distance from equal shares: much smaller than the file's
        tv_drawn, tv_file = np.abs(drawn - 1 / 3).sum() / 2, np.abs(file_share - 1 / 3).sum() / 2
        assert tv_drawn < 0.6 * tv_file
        if bound is not None:
            assert np.abs(drawn - 1 / 3).max() < bound  # inverse frequency: about equal shares
        assert drawn[2] > 5 * file_share[2]  # the rare class is drawn far more often than it occurs


def test_other_orders_are_unchanged():
    n_obs, chunk_size, block_size = [100, 0, 57, 33], 40, 6
    for order in ("sequential", "block_shuffle"):
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
        new = plan_chunks(n_obs, chunk_size, order=order, block_size=block_size, rng=rng_a)
        if order == "sequential":
            old = _cut([(f, 0, n) for f, n in enumerate(n_obs) if n > 0], chunk_size)
        else:  # the block_shuffle of before order='weighted' existed
            blocks = [(f, s, min(s + block_size, n)) for f, n in enumerate(n_obs) for s in range(0, n, block_size)]
            perm = rng_b.permutation(len(blocks))
            old = [_merge_sorted(c) for c in _cut([blocks[i] for i in perm], chunk_size)]
        assert new == old
        assert rng_a.random() == rng_b.random()  # the same draws from the run's generator


def test_weighted_plan_errors():
    with pytest.raises(scc.InputError, match="needs weights"):
        plan_chunks([10], 5, order="weighted", rng=np.random.default_rng(0))
    with pytest.raises(scc.InputError, match="weight 0"):
        plan_chunks([10], 5, order="weighted", rng=np.random.default_rng(0), weights=[np.zeros(10)])
    with pytest.raises(scc.InputError, match="10 rows but 9 weights"):
        plan_chunks([10], 5, order="weighted", rng=np.random.default_rng(0), weights=[np.ones(9)])
    with pytest.raises(scc.InputError, match="n_draws"):
        plan_chunks([10], 5, order="weighted", rng=np.random.default_rng(0), weights=[np.ones(10)], n_draws=0)
    with pytest.raises(scc.InputError, match="non-negative"):
        plan_chunks([2], 5, order="weighted", rng=np.random.default_rng(0), weights=[np.array([1.0, -1.0])])


def test_repeated_and_overlapping_segments_are_read_as_drawn(small_stream, small_gene_space):
    # one block drawn twice, next to the following block: [(0,0,8), (0,0,16)] after merging touching segments
    chunk = _merge_sorted([(0, 0, 8), (0, 8, 16), (0, 0, 8), (1, 4, 6)])
    assert chunk == [(0, 0, 8), (0, 0, 16), (1, 4, 6)]
    with open_sources(small_stream.files[:2]) as sources:
        reader = ChunkReader(sources, small_gene_space, "cell_type", n_workers=1)
        c = reader.read(0, chunk)
    expected_rows = [*range(8), *range(16), 4, 5]
    assert c.row.tolist() == expected_rows and c.file_index.tolist() == [0] * 24 + [1] * 2
    np.testing.assert_array_equal(c.X[:8], c.X[8:16])  # the same cells, read twice
    mem = ad.read_h5ad(small_stream.files[0])
    np.testing.assert_array_equal(c.X[:8], small_gene_space.transform(mem.X[:8], mem.var_names))


# -- end to end --------------------------------------------------------------------------------------------

KW = dict(chunk_size=250, buffer_size=60, epochs_per_step=1, hidden=(16,), final_epochs=1, progress=False)


def test_stream_train_weighted_order(small_stream, small_gene_space):
    cs = scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, order="weighted",
                             block_size=16, n_draws=900, **KW)  # fmt: skip
    assert cs.n_obs == KW["buffer_size"]
    keys = set(zip(cs.obs["sccoreset_file"].astype(str), cs.obs["sccoreset_row"], strict=True))
    assert len(keys) == cs.n_obs  # every cell once, though blocks are drawn with replacement
    assert cs.uns["sccoreset"]["history"]["buffer_class_counts"].shape[0] == 4  # ceil(900 / 250) steps
    with pytest.raises(scc.InputError, match=r"obs has no column 'nope'"):
        scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, order="weighted",
                            weight_key="nope", **KW)  # fmt: skip
