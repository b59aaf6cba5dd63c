"""Plain per-element references of the reading kernels' arithmetic, shared by the tests that check them."""

from __future__ import annotations

import numpy as np


def row_scale(values, target_sum: float) -> np.float32:
    """``target_sum`` over the row's float32 sum, summed in order as the kernels do (0 for a row summing to 0)."""
    s = np.float32(0)
    for x in np.asarray(values, dtype=np.float32):
        s += x
    return np.float32(target_sum / s) if s > 0 else np.float32(0)


def row_statistics(values, target_sum: float) -> np.ndarray | None:
    """x, x², log1p(x), log1p(x)² (float64 rows) of the normalized values, as the statistics kernel sums them.

    None for a row summing to 0, which adds nothing.
    """
    scale = row_scale(values, target_sum)
    if scale == 0:
        return None
    x = np.asarray(values, dtype=np.float32) * scale
    lx = np.log1p(x).astype(np.float64)
    xd = x.astype(np.float64)
    return np.stack([xd, xd**2, lx, lx**2])
