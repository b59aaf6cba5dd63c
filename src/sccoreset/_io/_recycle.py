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
    """Hand out float32 arrays of a given shape, reusing ones that are no longer referenced."""

    def __init__(self, max_tracked: int = 4) -> None:
        self._arrays: list[np.ndarray] = []
        self._max = max_tracked
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, int], dtype: np.dtype = np.float32) -> np.ndarray:
        with self._lock:
            for i in range(len(self._arrays)):
                # 2 references: the list's and getrefcount's argument
                if sys.getrefcount(self._arrays[i]) == 2 and self._arrays[i].shape == shape:
                    return self._arrays[i]
            arr = np.empty(shape, dtype=dtype)
            if len(self._arrays) < self._max:
                self._arrays.append(arr)
            else:  # replace an array of another shape that nobody holds, if any
                for i in range(len(self._arrays)):
                    if sys.getrefcount(self._arrays[i]) == 2:
                        self._arrays[i] = arr
                        break
            return arr
