"""Read slices of uncompressed HDF5 datasets with ``os.preadv``, which releases the GIL.

h5py holds the GIL while it reads, so a background reading thread would stall the training thread
and the transform thread for the whole copy. For datasets stored without filters (what anndata
writes by default) the bytes of a slice sit at known file offsets: one lookup of the chunk layout
per dataset, then plain positioned reads straight into the caller's buffer.

The chunk addresses come from ``H5Dchunk_iter``, which ignores the userblock before HDF5 1.14.4
(HDF5 issue 3003; mudata writes .h5mu files with a 512-byte userblock), and which older h5py lacks.
The fast path is taken only where it is known right, and its first reads are checked against h5py.
"""

from __future__ import annotations

import os
import sys

import h5py
import numpy as np

VERIFY_ELEMENTS = 4096


def chunk_addresses_trusted(file: h5py.File) -> bool:
    """Whether ``H5Dchunk_iter`` byte offsets are file offsets: HDF5 >= 1.14.4 or no userblock."""
    if tuple(h5py.version.hdf5_version_tuple) >= (1, 14, 4):
        return True
    try:
        return file.id.get_create_plist().get_userblock() == 0
    except (AttributeError, OSError):  # pragma: no cover - very old h5py
        return False


def has_chunk_iter(dataset: h5py.Dataset) -> bool:
    return hasattr(dataset.id, "chunk_iter")


class DirectDataset:
    """Positioned reads of a 1-D dataset; ``usable`` is False when h5py must do the reading."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dtype = dataset.dtype
        self.length = dataset.shape[0] if dataset.ndim == 1 else 0
        self.usable = False
        native = self.dtype.byteorder in ("=", "|") or (self.dtype.byteorder == "<") == (sys.byteorder == "little")
        if dataset.ndim != 1 or not native or dataset.id.get_create_plist().get_nfilters() > 0:
            return
        itemsize = self.dtype.itemsize
        if dataset.chunks is None:
            offset = dataset.id.get_offset()
            if offset is None:
                return
            self.starts = np.array([0], dtype=np.int64)
            self.offsets = np.array([offset], dtype=np.int64)
            self.chunk_len = max(self.length, 1)
        else:
            if not has_chunk_iter(dataset) or not chunk_addresses_trusted(dataset.file):
                return
            found: list[tuple[int, int]] = []
            dataset.id.chunk_iter(lambda info: found.append((info.chunk_offset[0], info.byte_offset)))
            if not found and self.length:
                return
            found.sort()
            self.starts = np.array([s for s, _ in found], dtype=np.int64)
            self.offsets = np.array([o for _, o in found], dtype=np.int64)
            self.chunk_len = dataset.chunks[0]
            expected = np.arange(0, self.length, self.chunk_len)
            if self.starts.size != expected.size or not np.array_equal(self.starts, expected):
                return  # unallocated chunks: leave it to h5py (fill values)
        self.itemsize = itemsize
        self.usable = True

    def verify(self, fd: int, dataset: h5py.Dataset) -> bool:
        """Whether positioned reads of the first and last elements equal what h5py reads."""
        n = min(self.length, VERIFY_ELEMENTS)
        for lo, hi in ((0, n), (self.length - n, self.length)):
            mine = np.empty(hi - lo, dtype=self.dtype)
            try:
                self.read_into(fd, lo, hi, mine)
            except OSError:
                return False
            if not np.array_equal(mine, dataset[lo:hi], equal_nan=mine.dtype.kind == "f"):
                return False
        return True

    def read_into(self, fd: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Elements ``[lo, hi)`` into ``out`` (length ``hi - lo``), in as few reads as the layout allows."""
        if hi <= lo:
            return
        view = memoryview(out).cast("B")
        first = int(lo // self.chunk_len)
        last = int((hi - 1) // self.chunk_len)
        pos = 0
        pending_offset = pending_len = -1
        for k in range(first, last + 1):
            el0 = max(lo, k * self.chunk_len)
            el1 = min(hi, (k + 1) * self.chunk_len)
            byte = int(self.offsets[k]) + (el0 - k * self.chunk_len) * self.itemsize
            n = (el1 - el0) * self.itemsize
            if pending_len >= 0 and pending_offset + pending_len == byte:
                pending_len += n  # touching the previous piece on disk: one read
                continue
            if pending_len > 0:
                _pread_exact(fd, view[pos : pos + pending_len], pending_offset)
                pos += pending_len
            pending_offset, pending_len = byte, n
        if pending_len > 0:
            _pread_exact(fd, view[pos : pos + pending_len], pending_offset)


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        got += n
