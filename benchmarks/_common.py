"""Helpers shared by the benchmarks: peak memory, macro-F1, JSON output, a raw h5py read to compare readers with."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import h5py
import numpy as np

MIB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: VmHWM (resettable), else ru_maxrss."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def rss_mib() -> float:
    """Current resident memory of this process in MiB (NaN where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def macro_f1(y_true, y_pred) -> float:
    """Macro-F1 over the classes present in ``y_true`` (labels of any hashable type)."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    scores = []
    for c in np.unique(y_true):
        tp = np.sum((y_true == c) & (y_pred == c))
        denom = np.sum(y_true == c) + np.sum(y_pred == c)
        scores.append(2 * tp / denom)
    return float(np.mean(scores))


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def write_json(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(record), indent=1))
    print(f"figures written to {path}")


def raw_read(files, chunk_size):
    """Cells/s of reading every row block's indptr, indices and data straight from the CSR arrays."""
    n = 0
    t0 = time.perf_counter()
    for path in files:
        with h5py.File(path, "r") as f:
            x = f["X"]
            total = x["indptr"].shape[0] - 1
            for start in range(0, total, chunk_size):
                stop = min(start + chunk_size, total)
                ptr = x["indptr"][start : stop + 1]
                x["data"][ptr[0] : ptr[-1]]
                x["indices"][ptr[0] : ptr[-1]]
                n += stop - start
    return n / (time.perf_counter() - t0)
