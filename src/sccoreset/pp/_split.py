"""`pp.stratified_split`: held-out cells chosen from obs alone (never X), by category or by whole groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._errors import InputError
from .._io._open_files import each_bounded
from .._io._sources import open_sources
from .._utils import RandomState, as_rng


def _column(sources, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [s.read_labels(key) for s in each_bounded(sources)]


def stratified_split(
    adata_or_files: Sequence[Any] | Any,
    key: str,
    *,
    fraction: float,
    group_key: str | None = None,
    random_state: RandomState = 0,
    mod: str | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Choose held-out cells: category-stratified, or whole groups (plates, donors) at a time.

    Only obs is read (backed files and paths never load X).

    - Without ``group_key``: in every category of ``key`` with at least two cells, ``round(fraction * n)``
      cells (at least 1, at most n - 1) are held out at random, so every such category is on both sides.
      A category with a single cell stays on the training side.
    - With ``group_key``: whole groups are held out, in random order, until at least ``fraction`` of the
      cells are; a group is skipped when holding it out would leave some category of ``key`` with no
      training cell.

    Cells whose ``key`` (or ``group_key``) is missing are never held out.

    Parameters
    ----------
    adata_or_files
        An AnnData / MuData (in memory or backed), a path, or a list of them.
    key
        obs column of the categories to stratify by (e.g. the labels).
    fraction
        Fraction of cells to hold out, in (0, 1).
    group_key
        obs column of groups held out whole (e.g. ``"plate"`` or ``"donor"``).
    random_state
        Seed.
    mod
        Modality of MuData inputs.

    Returns
    -------
    A boolean mask of held-out cells per input (one array for a single input, a list for a list).
    """
    if not (isinstance(fraction, int | float) and 0 < fraction < 1):
        raise InputError(f"fraction must be in (0, 1), got {fraction!r}.")
    single = not isinstance(adata_or_files, list | tuple)
    rng = as_rng(random_state)
    with open_sources(adata_or_files, mod=mod) as sources:
        labels = _column(sources, key)
        groups = _column(sources, group_key) if group_key is not None else None
        sizes = [s.n_obs for s in sources]
    y = np.concatenate([v for v, _ in labels])
    valid = ~np.concatenate([m for _, m in labels])
    if groups is not None:
        g = np.concatenate([v for v, _ in groups])
        valid &= ~np.concatenate([m for _, m in groups])
        held = _group_split(y, g, valid, fraction, rng)
    else:
        held = _category_split(y, valid, fraction, rng)
    masks = np.split(held, np.cumsum(sizes)[:-1])
    return masks[0] if single else masks


def _category_split(y: np.ndarray, valid: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    held = np.zeros(y.size, dtype=bool)
    codes, cats = pd.factorize(pd.Series(y[valid], dtype=object), sort=True)
    idx = np.flatnonzero(valid)
    for c in range(len(cats)):
        members = idx[codes == c]
        n = members.size
        if n < 2:
            continue
        k = min(max(round(fraction * n), 1), n - 1)
        held[rng.choice(members, size=k, replace=False)] = True
    return held


def _group_split(
    y: np.ndarray, g: np.ndarray, valid: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    held = np.zeros(y.size, dtype=bool)
    idx = np.flatnonzero(valid)
    frame = pd.DataFrame({"y": y[idx], "g": g[idx]})
    train_counts = frame["y"].value_counts()
    target = fraction * idx.size
    n_held = 0
    group_names = sorted(frame["g"].unique())
    for name in rng.permutation(np.asarray(group_names, dtype=object)):
        if n_held >= target:
            break
        members = frame["g"].to_numpy() == name
        counts = frame.loc[members, "y"].value_counts()
        if ((train_counts.reindex(counts.index) - counts) <= 0).any():
            continue  # this group holds the last training cells of some category
        train_counts = train_counts.sub(counts, fill_value=0)
        held[idx[members]] = True
        n_held += int(members.sum())
    return held
