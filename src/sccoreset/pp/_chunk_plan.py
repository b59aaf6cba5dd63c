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
    """Sort segments by file and row, joining touching ones so each run is read in one slice."""
    out: list[Segment] = []
    for f, start, stop in sorted(segments):
        if out and out[-1][0] == f and out[-1][2] == start:
            out[-1] = (f, out[-1][1], stop)
        else:
            out.append((f, start, stop))
    return out


def plan_chunks(
    n_obs: Sequence[int],
    chunk_size: int,
    *,
    order: Order = "sequential",
    block_size: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[list[Segment]]:
    """Split the rows of all files into chunks of ``chunk_size`` rows (the last may be smaller).

    ``sequential`` keeps file order and row order. ``block_shuffle`` cuts every file into blocks of
    ``block_size`` rows, shuffles the blocks of all files and assembles them into chunks, reading
    each chunk's blocks in sorted (file, row) order.
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
    blocks = [(f, s, min(s + block_size, int(n))) for f, n in enumerate(n_obs) for s in range(0, int(n), block_size)]
    rng = np.random.default_rng() if rng is None else rng
    perm = rng.permutation(len(blocks))
    return [_merge_sorted(c) for c in _cut([blocks[i] for i in perm], chunk_size)]
