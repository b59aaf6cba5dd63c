"""Reuse large output arrays once nobody holds them any more.

Faulting in fresh memory for every 80 MB chunk costs as much as transforming it. An array handed
out by :class:`ArrayRecycler` is reused only when the recycler's own list holds the last reference
to it: numpy views keep a reference to the array that owns the memory, so an array that the caller
(or any view of it) still uses is never overwritten.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


class ArrayRecycler:
    """Hand out float32 arrays of a given shape, reusing ones that are no longer referenced.

    With ``pin_memory=True`` and CUDA available, new arrays are page-locked host memory (allocated by
    torch, viewed as numpy), which the GPU copies from asynchronously (``non_blocking=True``). The
    reuse rule is the same: an array is overwritten only once nobody references it, so a trainer that
    starts an asynchronous copy must keep the chunk (or a tensor made from it with ``torch.from_numpy``,
    which references it) until the copy has completed.
    """

    def __init__(self, max_tracked: int = 4, *, pin_memory: bool = False) -> None:
        self._arrays: list[np.ndarray] = []
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self.pinned = pin_memory and _cuda_available()

    def _new(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        if self.pinned and np.dtype(dtype) == np.float32:
            import torch

            return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()
        return np.empty(shape, dtype=dtype)

    def empty(self, shape: tuple[int, int], dtype: np.dtype = np.float32) -> np.ndarray:
        with self._lock:
            for i in range(len(self._arrays)):
                # 2 references: the list's and getrefcount's argument
                if sys.getrefcount(self._arrays[i]) == 2 and self._arrays[i].shape == shape:
                    return self._arrays[i]
            arr = self._new(shape, dtype)
            if len(self._arrays) < self.max_tracked:
                self._arrays.append(arr)
            else:  # replace an array of another shape that nobody holds, if any
                for i in range(len(self._arrays)):
                    if sys.getrefcount(self._arrays[i]) == 2:
                        self._arrays[i] = arr
                        break
            return arr


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())
