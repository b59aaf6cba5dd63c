"""Which rows of which file go into which chunk: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._config import Order, check_choice
from .._errors import InputError

Segment = tuple[int, int, int]  # (file index, start row, stop row)


def _cut(blocks: list[Segment], chunk_size: int) -> list[list[Segment]]:
    """Concatenate blocks into one virtual stream and cut it into chunks of exactly ``chunk_size`` rows."""
    chunks: list[list[Segment]] = []
    current: list[Segment] = []
    room = chunk_size
    for f, start, stop in blocks:
        while start < stop:
            take = min(room, stop - start)
            current.append((f, start, start + take))
            start += take
            room -= take
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_size
    if current:
        chunks.append(current)
    return chunks


def _merge_sorted(segments: list[Segment]) -> list[Segment]:
    """Sort segments by file and row, joining touching ones so each run is read in one slice.

    Copies of one segment (a weighted draw of one block twice) are never joined into one: every row is
    kept as often as it was drawn, so segments may repeat or overlap (the reader reads each on its own).
    """
    out: list[Segment] = []
    for f, start, stop in sorted(segments):
        if out and out[-1][0] == f and out[-1][2] == start:
            out[-1] = (f, out[-1][1], stop)
        else:
            out.append((f, start, stop))
    return out


def _weighted_draws(
    n_obs: Sequence[int],
    block_size: int,
    weights: Sequence[np.ndarray],
    n_draws: int | None,
    rng: np.random.Generator,
) -> list[Segment]:
    """Blocks drawn with replacement in proportion to their weights until ``n_draws`` rows are drawn."""
    if len(weights) != len(n_obs):
        raise InputError(f"order='weighted': {len(weights)} weight arrays for {len(n_obs)} files.")
    blocks: list[Segment] = []
    block_w: list[np.ndarray] = []
    for f, (n, w) in enumerate(zip(n_obs, weights, strict=True)):
        n, w = int(n), np.asarray(w, dtype=np.float64)
        if w.shape != (n,):
            raise InputError(f"order='weighted': file {f} has {n} rows but {w.size} weights.")
        if n == 0:
            continue
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise InputError(f"order='weighted': the weights of file {f} must be finite and non-negative.")
        starts = np.arange(0, n, block_size)
        blocks += [(f, int(s), min(int(s) + block_size, n)) for s in starts]
        block_w.append(np.add.reduceat(w, starts))
    total = int(sum(int(n) for n in n_obs))
    n_draws = total if n_draws is None else n_draws
    if isinstance(n_draws, bool) or not isinstance(n_draws, int | np.integer) or n_draws <= 0:
        raise InputError(f"n_draws must be a positive integer, got {n_draws!r}.")
    if total == 0:
        return []
    cdf = np.cumsum(np.concatenate(block_w))
    if not cdf[-1] > 0:
        raise InputError("order='weighted': every cell has weight 0 (no cell has a value for the weight keys).")
    cdf /= cdf[-1]  # a zero-weight block adds nothing to the cdf: searchsorted never lands on it
    sizes = np.array([stop - start for _, start, stop in blocks], dtype=np.int64)
    drawn, count = [], 0
    while count < n_draws:
        k = -(-(n_draws - count) // block_size)  # enough when the blocks drawn are whole
        idx = np.minimum(np.searchsorted(cdf, rng.random(k), side="right"), len(blocks) - 1)
        drawn.append(idx)
        count += int(sizes[idx].sum())
    idx = np.concatenate(drawn)
    ends = np.cumsum(sizes[idx])
    last = int(np.searchsorted(ends, n_draws))  # the first block that reaches n_draws, cut short to it
    out = [blocks[i] for i in idx[: last + 1]]
    f, start, stop = out[-1]
    out[-1] = (f, start, stop - int(ends[last] - n_draws))
    return out


def plan_chunks(
    n_obs: Sequence[int],
    chunk_size: int,
    *,
    order: Order = "sequential",
    block_size: int | None = None,
    rng: np.random.Generator | None = None,
    weights: Sequence[np.ndarray] | None = None,
    n_draws: int | None = None,
) -> list[list[Segment]]:
    """Split the rows of all files into chunks of ``chunk_size`` rows (the last may be smaller).

    ``sequential`` keeps file order and row order. ``block_shuffle`` cuts every file into blocks of
    ``block_size`` rows, shuffles the blocks of all files and assembles them into chunks, reading
    each chunk's blocks in sorted (file, row) order. ``weighted`` (scDataset's weighted block sampling)
    cuts the files into blocks the same way, gives each block the sum of its cells' ``weights`` (one
    array per file, e.g. from :func:`~sccoreset.pp.balanced_weights`) and draws blocks with replacement
    in proportion to those sums until ``n_draws`` rows (default: all rows of the files) are drawn, the
    last block cut short; the drawn blocks are assembled into chunks like ``block_shuffle``'s. A block
    drawn twice yields its rows twice (as separate, possibly overlapping segments); a block of weight 0
    is never drawn. ``weights`` and ``n_draws`` are only used by ``weighted``.
    """
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}.")
    check_choice("order", order, Order)
    if order == "sequential":
        return _cut([(f, 0, int(n)) for f, n in enumerate(n_obs) if n > 0], chunk_size)
    if block_size is None:
        block_size = max(1, min(chunk_size // 8, 1024))
    elif block_size <= 0:
        raise InputError(f"block_size must be positive, got {block_size}.")
    rng = np.random.default_rng() if rng is None else rng
    if order == "weighted":
        if weights is None:
            raise InputError("order='weighted' needs weights: one array of per-cell weights per file.")
        drawn = _weighted_draws(n_obs, block_size, weights, n_draws, rng)
        return [_merge_sorted(c) for c in _cut(drawn, chunk_size)]
    blocks = [(f, s, min(s + block_size, int(n))) for f, n in enumerate(n_obs) for s in range(0, int(n), block_size)]
    perm = rng.permutation(len(blocks))
    return [_merge_sorted(c) for c in _cut([blocks[i] for i in perm], chunk_size)]
