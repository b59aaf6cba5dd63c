"""Choosing the next buffer: class budgets over all classes seen, a rule ranking cells within a class, chunk caps.

Pure numpy, no torch, no AnnData. Every rule returns a *priority order* of a class's cells; budgets,
per-chunk caps and backfilling are applied on top of that order, so all rules share them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._config import ClassBudget, Rule, check_choice
from .._errors import InputError


def class_budgets(
    available: np.ndarray,
    seen_counts: np.ndarray,
    total: int,
    *,
    class_budget: ClassBudget = "proportional",
    min_per_class: int = 0,
) -> np.ndarray:
    """Cells to keep per class.

    Shares follow ``seen_counts`` (cells of each class seen so far in the whole stream) for
    ``"proportional"``, or are equal over the seen classes for ``"balanced"``; a class absent from the
    current merge keeps its share of the budget as long as it has cells to fill it. ``"merged"`` is
    plain stratified sampling: shares follow the classes' counts in the current merge, so a class
    missing from recent chunks shrinks step after step (kept as a baseline). Each class first
    gets ``min(min_per_class, available)``; budgets never exceed ``available`` and what a class
    cannot use goes to the others, so the budgets sum to ``min(total, available.sum())``.
    """
    available = np.asarray(available, dtype=np.int64)
    seen = (np.asarray(seen_counts) > 0) | (available > 0)
    total = int(min(total, available.sum()))
    if class_budget == "balanced":
        weights = seen.astype(np.float64)
    elif class_budget == "merged":
        weights = available.astype(np.float64)
    elif class_budget == "proportional":
        weights = np.where(seen, np.maximum(np.asarray(seen_counts, dtype=np.float64), 1.0), 0.0)
    else:
        check_choice("class_budget", class_budget, ClassBudget)
    budget = np.minimum(available, min_per_class) * seen
    if budget.sum() > total:  # the floor alone does not fit: spread it evenly
        budget = np.zeros_like(available)
        while budget.sum() < total:
            open_ = np.flatnonzero((budget < available) & seen)
            budget[open_[: total - budget.sum()]] += 1
        return budget
    # water-filling: hand out the rest by weight, capped at what each class has
    while budget.sum() < total:
        open_ = (budget < available) & (weights > 0)
        if not open_.any():
            open_ = budget < available
            weights = open_.astype(np.float64)
        room = total - budget.sum()
        share = np.where(open_, weights, 0.0)
        share = share / share.sum() * room
        add = np.minimum(np.floor(share).astype(np.int64), available - budget)
        if add.sum() == 0:  # fractions only: give single cells to the largest shares
            order = np.argsort(-share, kind="stable")
            for c in order[:room]:
                if open_[c]:
                    add[c] = 1
        budget += add
    return budget


def _efraimidis_spirakis(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order for weighted sampling without replacement: taking any prefix is a weighted sample."""
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1e-12)
    keys = np.log(rng.random(w.size)) / w
    return np.argsort(-keys, kind="stable")


def _ranked(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices by ascending score, equal scores in random order (not by position, which favours the buffer).

    Without ties (the usual case for real-valued scores) the order is the plain argsort, three times faster
    than the two-key lexsort it equals; with ties (or NaNs) the lexsort. The random keys are drawn either way,
    so the generator advances alike.
    """
    keys = rng.random(scores.size)
    order = np.argsort(scores)  # without ties any sort gives the one order
    ranked = scores[order]
    if np.all(ranked[1:] > ranked[:-1]):
        return order
    return np.lexsort((keys, scores))


def coverage_order(scores: np.ndarray, k: int, drop_hard: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` cells evenly spaced over the score range after dropping the hardest ``drop_hard`` fraction.

    The evenly spaced picks come first, then the other kept cells in random order, the hardest tail
    last (used only to backfill).
    """
    n = scores.size
    order = _ranked(scores, rng)  # ascending: hardest first
    n_hard = min(int(np.floor(drop_hard * n)), max(n - k, 0))
    hard, easy = order[:n_hard], order[n_hard:]
    k = min(k, easy.size)
    if k == 0:
        return np.concatenate([rng.permutation(easy), hard])
    pos = np.floor(np.linspace(0, easy.size - 1, k) + 0.5).astype(np.int64) if k > 1 else np.array([easy.size // 2])
    picked = np.zeros(easy.size, dtype=bool)
    picked[pos] = True
    return np.concatenate([easy[pos], rng.permutation(easy[~picked]), hard])


def priority_order(
    rule: Rule,
    scores: np.ndarray,
    forgetting: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    drop_hard: float = 0.1,
    temperature: float = 4.0,
) -> np.ndarray:
    """A permutation of ``range(len(scores))``: the order in which ``rule`` wants to keep cells."""
    n = scores.size
    if rule == "top":
        return _ranked(-scores, rng)
    if rule == "random":
        return rng.permutation(n)
    if rule == "weighted":
        # logistic weight of the score's quantile: confident cells likelier, hard ones still possible
        ranks = np.empty(n)
        ranks[np.argsort(scores, kind="stable")] = np.arange(n)
        q = ranks / max(n - 1, 1)
        return _efraimidis_spirakis(1.0 / (1.0 + np.exp(-temperature * (q - 0.5))), rng)
    if rule == "forgetting":
        return _efraimidis_spirakis(np.asarray(forgetting, dtype=np.float64) + 0.1, rng)
    if rule == "coverage":
        return coverage_order(scores, k, drop_hard, rng)
    check_choice("rule", rule, Rule)
    raise AssertionError(rule)


def select(
    labels: np.ndarray,
    scores: np.ndarray,
    m: int,
    *,
    n_classes: int,
    seen_counts: np.ndarray | None = None,
    rule: Rule = "coverage",
    class_budget: ClassBudget = "proportional",
    min_per_class: int = 0,
    chunk_ids: np.ndarray | None = None,
    max_chunk_fraction: float | None = None,
    forgetting: np.ndarray | None = None,
    ages: np.ndarray | None = None,
    score_decay: float | None = None,
    drop_hard: float = 0.1,
    rng: np.random.Generator | None = None,
    herd: Callable[[list[np.ndarray], np.ndarray, list[int], list[int | None]], list[np.ndarray]] | None = None,
) -> np.ndarray:
    """Indices (sorted, unique) of the ``min(m, n)`` cells to keep.

    Parameters
    ----------
    labels
        Integer class of every candidate cell.
    scores
        Higher is easier/more confident (e.g. AUM margin).
    m
        Buffer size.
    n_classes
        Number of classes of the whole stream.
    seen_counts
        Cells of each class seen so far in the stream (defaults to the candidates' counts).
    rule
        How cells are ranked within a class (see :data:`sccoreset._config.Rule`).
    class_budget, min_per_class
        See :func:`class_budgets`.
    chunk_ids, max_chunk_fraction
        Within a class, at most ``ceil(max_chunk_fraction * budget)`` cells from one chunk; the rest of
        the budget is backfilled in priority order.
    forgetting
        Forgetting events per cell (rule ``"forgetting"``).
    ages, score_decay
        Scores are lowered by ``score_decay * age`` standard deviations of the class's scores.
    drop_hard
        Fraction of hardest cells the ``"coverage"`` rule leaves out.
    rng
        Random generator.
    herd
        Rule ``"herding"``: ``herd(cells, classes, ks, caps)`` takes every budgeted class's candidate cells and
        returns, per class, the positions in its ``cells`` of the ``ks[c]`` cells picked by herding, at most
        ``caps[c]`` per chunk while other chunks have cells (see :mod:`sccoreset._engine._herding`).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n = labels.size
    if scores.size != n:
        raise InputError("select: labels and scores must have the same length.")
    if m < 0:
        raise InputError(f"buffer_size must be non-negative, got {m}.")
    check_choice("rule", rule, Rule)
    if rule == "herding" and herd is None:
        raise InputError("select: rule='herding' needs herd=, which sees the cells' features.")
    rng = np.random.default_rng() if rng is None else rng
    forgetting = np.zeros(n) if forgetting is None else np.asarray(forgetting)
    available = np.bincount(labels, minlength=n_classes)
    seen_counts = available if seen_counts is None else np.asarray(seen_counts)
    budgets = class_budgets(available, seen_counts, m, class_budget=class_budget, min_per_class=min_per_class)
    keep = []
    # every class's cells in index order, one sort for all (a radix sort on the smallest integer type)
    by_class = np.argsort(labels.astype(np.min_scalar_type(max(available.size - 1, 0))), kind="stable")
    starts = np.concatenate([[0], np.cumsum(available)])
    classes = np.flatnonzero(budgets)
    cells = [by_class[starts[c] : starts[c + 1]] for c in classes]
    capped = chunk_ids is not None and max_chunk_fraction is not None
    if rule == "herding" and cells:  # every class at once: herding batches them
        ks = [int(budgets[c]) for c in classes]
        caps = [_chunk_cap(k, max_chunk_fraction) if capped else None for k in ks]
        keep = [idx[picked] for idx, picked in zip(cells, herd(cells, classes, ks, caps), strict=True)]
    elif rule != "herding":
        for c, idx in zip(classes, cells, strict=True):
            s = scores[idx]
            if score_decay and ages is not None:
                spread = s.std() if s.size > 1 and s.std() > 0 else 1.0
                s = s - score_decay * spread * np.asarray(ages)[idx]
            order = idx[priority_order(rule, s, forgetting[idx], int(budgets[c]), rng, drop_hard=drop_hard)]
            keep.append(_take_with_caps(order, int(budgets[c]), chunk_ids, max_chunk_fraction))
    if not keep:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep))


def _chunk_cap(k: int, max_fraction: float) -> int:
    """Most cells of a class's budget ``k`` that may come from one chunk."""
    return max(1, int(np.ceil(max_fraction * k)))


def _take_with_caps(order: np.ndarray, k: int, chunk_ids: np.ndarray | None, max_fraction: float | None) -> np.ndarray:
    """First ``k`` of ``order``, at most ``ceil(max_fraction * k)`` per chunk, backfilled in order."""
    if chunk_ids is None or max_fraction is None or k == 0:
        return order[:k]
    cap = _chunk_cap(k, max_fraction)
    chunks = np.asarray(chunk_ids)[order]
    if chunks.size and chunks.dtype.kind in "iu" and chunks.min() >= 0:  # a radix sort on the smallest type
        chunks = chunks.astype(np.min_scalar_type(chunks.max()))
    # rank of each cell among the earlier cells (in priority order) of its chunk
    by_chunk = np.argsort(chunks, kind="stable")
    sorted_chunks = chunks[by_chunk]
    starts = np.flatnonzero(np.concatenate(([True], sorted_chunks[1:] != sorted_chunks[:-1])))
    group_start = np.repeat(starts, np.diff(np.append(starts, chunks.size)))
    rank = np.empty(chunks.size, dtype=np.int64)
    rank[by_chunk] = np.arange(chunks.size) - group_start
    taken = rank < cap
    taken &= np.cumsum(taken) <= k
    short = k - int(taken.sum())
    if short > 0:  # backfill: the cap cannot be met with the cells there are
        taken[np.flatnonzero(~taken)[:short]] = True
    return order[taken]
