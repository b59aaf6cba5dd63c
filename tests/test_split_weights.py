"""pp.stratified_split (category-stratified, group-aware, obs only) and pp.balanced_weights (scDataset's rule)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset._utils import h5ad_safe_strings


def _adata(labels, groups=None):
    n = len(labels)
    obs = pd.DataFrame({"label": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)])
    if groups is not None:
        obs["plate"] = pd.Categorical(groups)
    a = ad.AnnData(sp.csr_matrix((n, 3), dtype=np.float32), obs=h5ad_safe_strings(obs))
    a.var_names = ["g0", "g1", "g2"]
    return a


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=2, max_size=6),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_every_category_with_two_cells_is_on_both_sides(counts, fraction, seed):
    labels = np.repeat([f"t{i}" for i in range(len(counts))], counts)
    np.random.default_rng(seed).shuffle(labels)
    held = scc.pp.stratified_split(_adata(labels), "label", fraction=fraction, random_state=seed)
    assert held.dtype == bool and held.size == labels.size
    for c, n in zip([f"t{i}" for i in range(len(counts))], counts, strict=True):
        k = held[labels == c].sum()
        if n >= 2:
            assert 1 <= k <= n - 1
            assert k == min(max(round(fraction * n), 1), n - 1)
        else:
            assert k == 0


@settings(max_examples=30, deadline=None)
@given(n_groups=st.integers(2, 8), fraction=st.floats(0.1, 0.6), seed=st.integers(0, 1000))
def test_groups_are_held_out_whole(n_groups, fraction, seed):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_groups)], rng.integers(5, 20, n_groups))
    labels = rng.choice(["a", "b", "c"], groups.size)
    held = scc.pp.stratified_split(_adata(labels, groups), "label", fraction=fraction, group_key="plate",
                                   random_state=seed)  # fmt: skip
    for g in np.unique(groups):
        assert held[groups == g].all() or not held[groups == g].any()  # whole groups only
    for c in np.unique(labels):
        assert (~held[labels == c]).any()  # every category keeps training cells
    # stopping rule: either the fraction is reached, or every group left would take a category's last cells
    if held.mean() < fraction:
        for g in np.unique(groups[~held]):
            rest = ~held & (groups != g)
            assert any(not rest[labels == c].any() for c in np.unique(labels))


def test_reads_obs_only_and_splits_lists_of_files(tmp_path, monkeypatch):
    paths = []
    for i in range(2):
        p = tmp_path / f"f{i}.h5ad"
        _adata(np.repeat(["a", "b"], 10), np.repeat([f"p{i}a", f"p{i}b"], 10)).write_h5ad(p)
        paths.append(p)
    from sccoreset._io._source import Source

    def no_x(*a, **k):
        raise AssertionError("X was read")

    monkeypatch.setattr(Source, "read_rows", no_x)
    masks = scc.pp.stratified_split(paths, "label", fraction=0.5, group_key="plate", random_state=1)
    assert isinstance(masks, list) and [m.size for m in masks] == [20, 20]
    backed = ad.read_h5ad(paths[0], backed="r")
    assert scc.pp.stratified_split(backed, "label", fraction=0.3).sum() == 6
    with pytest.raises(scc.InputError, match="fraction must be in"):
        scc.pp.stratified_split(paths, "label", fraction=1.0)


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(1, 500), min_size=1, max_size=6),
    baseline=st.sampled_from([0, 10, 1000]),
)
def test_balanced_weights_follow_count_plus_baseline(counts, baseline):
    labels = np.repeat([f"t{i}" for i in range(len(counts))], counts)
    w = scc.pp.balanced_weights(labels, baseline=baseline)
    assert w.shape == labels.shape and np.isclose(w.sum(), 1.0) and (w > 0).all()
    per_class = {c: w[labels == c] for c in np.unique(labels)}
    for c, n in zip([f"t{i}" for i in range(len(counts))], counts, strict=True):
        assert np.allclose(per_class[c], per_class[c][0])  # equal within a class
        ref_n, ref_w = counts[0], per_class["t0"][0]
        assert np.isclose(per_class[c][0] / ref_w, (ref_n + baseline) / (n + baseline))
    if baseline == 0:
        totals = [per_class[c].sum() for c in per_class]
        assert np.allclose(totals, totals[0])  # plain inverse frequency: every class drawn equally


def test_balanced_weights_over_a_tuple_of_keys():
    frame = pd.DataFrame({"line": ["x", "x", "x", "y"], "drug": ["d1", "d1", "d2", "d1"]})
    w = scc.pp.balanced_weights(frame, baseline=0)
    assert np.allclose([w[:2].sum(), w[2], w[3]], 1 / 3)
    with pytest.raises(scc.InputError, match="missing values"):
        scc.pp.balanced_weights(pd.DataFrame({"a": ["x", None]}))
