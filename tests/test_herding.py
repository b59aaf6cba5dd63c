"""The herding rule: kept cells whose mean tracks the class's mean over the stream."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
import sccoreset._engine._loop as loop_mod
from sccoreset._engine._herding import ClassMeans, herd_classes, herding_order
from sccoreset._engine._selection import select
from sccoreset._errors import InputError

FAST = dict(chunk_size=300, buffer_size=60, epochs_per_step=2, final_epochs=1, progress=False, n_top_genes=100)


def mean_error(P: np.ndarray, picked: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(P[picked].mean(0) - target))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 6),
    k=st.integers(0, 45),
    n_groups=st.integers(1, 4),
    cap=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_herding_picks_distinct_rows_within_the_caps(n, d, k, n_groups, cap, seed):
    rng = np.random.default_rng(seed)
    P = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    groups = rng.integers(0, n_groups, n)
    picked = herding_order(P, P.mean(0), k, groups=groups, cap=cap)
    assert picked.size == min(k, n)
    assert np.unique(picked).size == picked.size and (picked >= 0).all() and (picked < n).all()
    # a group goes over its cap only once every group with open rows is full
    per_group = np.bincount(groups[picked], minlength=n_groups)
    sizes = np.bincount(groups, minlength=n_groups)
    if np.minimum(sizes, cap).sum() >= picked.size:
        assert (per_group <= cap).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 5), k=st.integers(1, 39), seed=st.integers(0, 2**16))
def test_the_first_pick_is_the_row_nearest_the_target_and_exchanges_never_hurt(n, d, k, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    target = rng.normal(size=d).astype(np.float32)
    P, t = torch.from_numpy(X), torch.from_numpy(target)
    k = min(k, n - 1)  # k >= n keeps every row, in no particular order
    greedy = herding_order(P, t, k, exchange_passes=0)
    dist = np.linalg.norm(X - target, axis=1)
    assert dist[greedy[0]] <= dist.min() + 1e-5
    exchanged = herding_order(P, t, k, exchange_passes=2)
    assert mean_error(X, exchanged, target) <= mean_error(X, greedy, target) + 1e-5


def test_herded_mean_beats_a_random_sample_of_the_same_size():
    # noisy cells around a class mean: herding picks cells whose noise cancels
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(2000, 50)) + 3.0).astype(np.float32)
    truth = X.mean(0)
    picked = herding_order(torch.from_numpy(X), torch.from_numpy(truth), 40)
    random_errors = [mean_error(X, rng.choice(2000, 40, replace=False), truth) for _ in range(50)]
    assert mean_error(X, picked, truth) < 0.5 * np.median(random_errors)


def test_class_means_count_every_cell_in_the_scaled_space():
    means = ClassMeans(3, 2, np.array([1.0, 10.0]), torch.device("cpu"))
    means.add(torch.tensor([[1.0, 1.0], [3.0, 2.0], [5.0, 0.0]]), np.array([0, 0, 2]))
    np.testing.assert_allclose(means.means(np.array([0, 2])).numpy(), [[2.0, 15.0], [5.0, 0.0]])
    assert means.counts.tolist() == [2, 0, 1]
    again = ClassMeans(3, 2, np.array([1.0, 10.0]), torch.device("cpu"))
    again.load_state_dict(means.state_dict())
    np.testing.assert_array_equal(again.sums.numpy(), means.sums.numpy())


def test_select_with_herding_needs_the_features():
    with pytest.raises(InputError, match="rule='herding' needs herd="):
        select(np.zeros(5, np.int64), np.zeros(5), 2, n_classes=1, rule="herding")


def test_select_with_herding_keeps_the_budgets_and_passes_the_chunk_cap():
    labels = np.repeat([0, 1], 10)
    calls = []

    def herd(cells, classes, ks, caps):
        calls.append(([c.tolist() for c in cells], classes.tolist(), ks, caps))
        return [np.arange(k)[::-1] for k in ks]  # positions into each class's cells

    keep = select(labels, np.zeros(20), 6, n_classes=2, rule="herding", class_budget="balanced",
                  chunk_ids=np.zeros(20, np.int64), max_chunk_fraction=0.5, herd=herd)  # fmt: skip
    assert calls == [([list(range(10)), list(range(10, 20))], [0, 1], [3, 3], [2, 2])]
    assert keep.tolist() == [0, 1, 2, 10, 11, 12]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    capped=st.booleans(),
)
def test_herding_classes_together_equals_herding_each_alone(sizes, d, seed, capped):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    P = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    owner = owner[rng.permutation(n)]  # rows of a class need not be together
    targets = torch.from_numpy(rng.normal(size=(len(sizes), d)).astype(np.float32))
    ks = [int(rng.integers(0, s + 2)) for s in sizes]
    groups = rng.integers(0, 3, n)
    caps = [int(rng.integers(1, 4)) if capped else None for _ in sizes]
    together = herd_classes(P, [np.flatnonzero(owner == c) for c in range(len(sizes))], targets, ks, groups=groups,
                            caps=caps)  # fmt: skip
    for c in range(len(sizes)):
        rows = np.flatnonzero(owner == c)
        alone = herding_order(P[rows], targets[c], ks[c], groups=groups[rows], cap=caps[c])
        assert together[c].tolist() == rows[alone].tolist()


@pytest.fixture(scope="module")
def full_gene_stream(tmp_path_factory) -> scc.datasets.SyntheticStream:
    """3 files x 400 cells x 300 genes, every gene in every file."""
    return scc.datasets.synthetic_stream(
        tmp_path_factory.mktemp("herding"), n_files=3, cells_per_file=400, n_genes=300, missing_gene_fraction=0.0,
        random_state=2,
    )  # fmt: skip


def per_class_mean_error(coreset, files, key) -> float:
    """Max over classes of the relative L2 error of the kept cells' mean log1p expression on the gene list."""
    full = ad.concat([ad.read_h5ad(f) for f in files])
    X = np.asarray(full.X.todense(), dtype=np.float64)
    x = np.log1p(X * (1e4 / X.sum(1))[:, None])[:, full.var_names.get_indexer(coreset.var_names)]
    rows = full.obs_names.get_indexer(coreset.obs_names)
    y_full, y_kept = full.obs[key].astype(str).to_numpy(), coreset.obs[key].astype(str).to_numpy()
    errors = []
    for c in np.unique(y_kept):
        truth = x[y_full == c].mean(0)
        errors.append(np.linalg.norm(x[rows[y_kept == c]].mean(0) - truth) / np.linalg.norm(truth))
    return max(errors)


def test_herding_coreset_follows_the_stream_means_better_than_coverage(full_gene_stream):
    kw = {**FAST, "buffer_size": 120}
    files, key = full_gene_stream.files, full_gene_stream.label_key
    herded = scc.tl.stream_train(files, key, rule="herding", **kw)
    covered = scc.tl.stream_train(files, key, **kw)
    assert herded.n_obs == covered.n_obs == 120
    assert herded.obs[key].value_counts().equals(covered.obs[key].value_counts())
    assert per_class_mean_error(herded, files, key) < 0.8 * per_class_mean_error(covered, files, key)


def test_interrupted_herding_run_resumes_exactly(small_stream, tmp_path):
    kw = {**FAST, "chunk_size": 200, "rule": "herding"}
    whole = scc.tl.stream_train(small_stream.files, "cell_type", checkpoint_dir=tmp_path / "a", **kw)
    with scc.tl.stream_events(small_stream.files, "cell_type", checkpoint_dir=tmp_path / "b", **kw) as events:
        for _, _ in zip(range(3), events, strict=False):
            pass  # stopped after 3 of 6 steps: the class means are in the checkpoint
    resumed = scc.tl.stream_train(small_stream.files, "cell_type", checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert list(resumed.obs_names) == list(whole.obs_names)


def test_herding_refuses_to_run_distributed(small_stream, monkeypatch):
    monkeypatch.setattr(loop_mod, "rank_world", lambda: (0, 2))
    cfg = scc.tl.StreamConfig(rule="herding")
    with pytest.raises(InputError, match=r"does not run under torch\.distributed"):
        loop_mod.StreamLoop(torch.nn.Linear(3, 2), cfg, n_classes=2, rng=np.random.default_rng(0))
