from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sccoreset._config import Rule, choices
from sccoreset._engine._herding import herding_order
from sccoreset._engine._selection import class_budgets, coverage_order, select

RULES = choices(Rule)

settings.register_profile("ci", max_examples=150, deadline=None)
settings.load_profile("ci")


@st.composite
def candidates(draw):
    n_classes = draw(st.integers(1, 6))
    n = draw(st.integers(0, 120))
    labels = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    scores = np.array(draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n)))
    chunks = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64)
    m = draw(st.integers(0, 150))
    return n_classes, labels, scores, chunks, m


def herd_on(features: np.ndarray, chunks: np.ndarray | None):
    """A ``herd=`` callable for :func:`select`: herding on ``features`` toward each class's candidates' mean."""
    P = torch.from_numpy(np.asarray(features, np.float32)[:, None])

    def herd(cells, classes, ks, caps):
        return [
            herding_order(P[idx], P[idx].mean(0), k, groups=None if chunks is None else chunks[idx], cap=cap)
            for idx, k, cap in zip(cells, ks, caps, strict=True)
        ]

    return herd


@given(
    data=candidates(),
    rule=st.sampled_from(RULES),
    budget=st.sampled_from(["balanced", "proportional", "merged"]),
    cap=st.one_of(st.none(), st.floats(0.05, 1.0)),
    seed=st.integers(0, 1000),
)
def test_exact_size_no_duplicates(data, rule, budget, cap, seed):
    n_classes, labels, scores, chunks, m = data
    keep = select(
        labels, scores, m, n_classes=n_classes, rule=rule, class_budget=budget, chunk_ids=chunks,
        max_chunk_fraction=cap, forgetting=np.abs(scores).astype(int), rng=np.random.default_rng(seed),
        herd=herd_on(scores, chunks),
    )  # fmt: skip
    assert keep.size == min(m, labels.size)
    assert np.unique(keep).size == keep.size
    assert ((keep >= 0) & (keep < labels.size)).all()


@given(data=candidates(), seed=st.integers(0, 1000))
def test_balanced_budgets_are_even_where_classes_can_fill_them(data, seed):
    n_classes, labels, scores, _, m = data
    keep = select(labels, scores, m, n_classes=n_classes, class_budget="balanced", rng=np.random.default_rng(seed))
    kept = np.bincount(labels[keep], minlength=n_classes)
    available = np.bincount(labels, minlength=n_classes)
    full = kept < available  # classes that could have given more
    if full.any():
        # a class that could give more never has fewer than any other class (minus one for rounding)
        assert kept[full].min() >= kept.max() - 1


@given(
    available=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    seen_extra=st.lists(st.integers(0, 1000), min_size=8, max_size=8),
    total=st.integers(0, 300),
    budget=st.sampled_from(["balanced", "proportional"]),
    floor=st.integers(0, 10),
)
def test_budgets_sum_and_bounds(available, seen_extra, total, budget, floor):
    available = np.array(available)
    seen = available + np.array(seen_extra[: available.size])
    b = class_budgets(available, seen, total, class_budget=budget, min_per_class=floor)
    assert b.sum() == min(total, available.sum())
    assert (b <= available).all() and (b >= 0).all()
    if np.minimum(available, floor).sum() <= total:
        assert (b >= np.minimum(available, floor)).all()


def test_class_absent_from_chunk_keeps_its_share():
    # class 0 lives only in the buffer (20 cells); class 1 floods in with the new chunk (1,000 cells)
    labels = np.array([0] * 20 + [1] * 1000)
    seen = np.array([5000, 1000])  # class 0 was abundant earlier in the stream
    merged = select(labels, np.zeros(labels.size), 40, n_classes=2, class_budget="merged", rng=np.random.default_rng(0))
    prop = select(labels, np.zeros(labels.size), 40, n_classes=2, seen_counts=seen, class_budget="proportional",
                  rng=np.random.default_rng(0))  # fmt: skip
    bal = select(labels, np.zeros(labels.size), 40, n_classes=2, seen_counts=seen, class_budget="balanced",
                 rng=np.random.default_rng(0))  # fmt: skip
    assert (labels[merged] == 0).sum() <= 1  # plain stratification squeezes it out
    assert (labels[prop] == 0).sum() == 20  # its stream share (5/6) is capped only by what it has
    assert (labels[bal] == 0).sum() == 20


@given(n=st.integers(1, 200), k=st.integers(0, 200), drop=st.floats(0, 0.9), seed=st.integers(0, 100))
def test_coverage_spreads_over_range_and_drops_hard_tail(n, k, drop, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    order = coverage_order(scores, k, drop, rng)
    assert sorted(order.tolist()) == list(range(n))
    k_eff = min(k, n)
    picked = order[:k_eff]
    n_hard = min(int(np.floor(drop * n)), max(n - k, 0))
    hardest = np.argsort(scores, kind="stable")[:n_hard]
    assert not set(picked.tolist()) & set(hardest.tolist())
    if k_eff >= 2:
        assert scores[picked].max() == scores.max()  # the easy end is covered


@given(data=candidates(), cap=st.floats(0.1, 0.9), seed=st.integers(0, 100), rule=st.sampled_from(["top", "herding"]))
def test_chunk_cap_holds_when_it_can(data, cap, seed, rule):
    n_classes, labels, scores, chunks, m = data
    keep = select(labels, scores, m, n_classes=n_classes, rule=rule, chunk_ids=chunks, max_chunk_fraction=cap,
                  rng=np.random.default_rng(seed), herd=herd_on(scores, chunks))  # fmt: skip
    for c in np.unique(labels[keep]):
        kc = keep[labels[keep] == c]
        budget = kc.size
        limit = max(1, int(np.ceil(cap * budget)))
        per_chunk = np.bincount(chunks[kc])
        cand = np.bincount(chunks[labels == c], minlength=per_chunk.size)
        # over the cap only where the other chunks had no cells left to backfill with
        spare = np.minimum(cand, limit).sum()
        if spare >= budget:
            assert per_chunk.max() <= limit


def test_forgetting_rule_prefers_forgotten_cells_without_replacement():
    labels = np.zeros(1000, dtype=np.int64)
    forgetting = np.zeros(1000)
    forgetting[:100] = 20
    keep = select(labels, np.zeros(1000), 100, n_classes=1, rule="forgetting", forgetting=forgetting,
                  rng=np.random.default_rng(0))  # fmt: skip
    assert np.unique(keep).size == 100
    assert (keep < 100).mean() > 0.8


def test_top_and_weighted_prefer_high_scores():
    labels = np.zeros(1000, dtype=np.int64)
    scores = np.arange(1000.0)
    top = select(labels, scores, 100, n_classes=1, rule="top")
    assert set(top.tolist()) == set(range(900, 1000))
    means = [
        scores[select(labels, scores, 100, n_classes=1, rule="weighted", rng=np.random.default_rng(s))].mean()
        for s in range(20)
    ]
    assert np.mean(means) > 570  # uniform sampling: 499.5 +- 6.5


def test_score_decay_lowers_old_cells():
    labels = np.zeros(200, dtype=np.int64)
    scores = np.ones(200)
    ages = np.r_[np.full(100, 5), np.zeros(100)]
    keep = select(labels, scores + np.random.default_rng(0).normal(0, 0.01, 200), 100, n_classes=1, rule="top",
                  ages=ages, score_decay=1.0)  # fmt: skip
    assert (keep >= 100).all()


@pytest.mark.parametrize("bad", [{"rule": "best"}, {"class_budget": "equal"}])
def test_unknown_options(bad):
    from sccoreset import InputError

    with pytest.raises(InputError):
        select(np.zeros(5, int), np.zeros(5), 2, n_classes=1, **bad)


def test_selection_is_seeded():
    rng_data = np.random.default_rng(0)
    labels = rng_data.integers(0, 3, 500)
    scores = rng_data.normal(size=500)
    a = select(labels, scores, 50, n_classes=3, rule="weighted", rng=np.random.default_rng(5))
    b = select(labels, scores, 50, n_classes=3, rule="weighted", rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


@settings(max_examples=300, deadline=None)
@given(
    scores=st.lists(
        st.one_of(st.floats(-3, 3), st.sampled_from([0.0, -0.0, 1.5, float("nan")])), min_size=0, max_size=60
    ),
    seed=st.integers(0, 1000),
)
def test_ranked_equals_the_score_then_random_key_sort(scores, seed):
    """The argsort fast path (no ties) and the lexsort (ties, NaNs) give the same order and draw alike."""
    from sccoreset._engine._selection import _ranked

    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    got = _ranked(scores, rng)
    ref_rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(got, np.lexsort((ref_rng.random(scores.size), scores)))
    assert rng.random() == ref_rng.random()  # the generator advanced by the same draws
