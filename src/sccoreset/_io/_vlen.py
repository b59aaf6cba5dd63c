"""The raw bytes of a variable-length string dataset, read from the file's global heap without h5py's conversion.

h5py decodes a dataset of 20,000 gene names in about 5 ms (HDF5 converts each string through its heap
cache and h5py makes a Python object of it), which dominates opening a small file. The bytes themselves sit
in the file's global heap: the dataset stores, per element, a 4-byte length and a heap ID (the address of a
heap collection and the index of the object in it). Reading those and the collections with positioned reads
gives every string's bytes in well under a millisecond, enough to tell whether a file's gene list is one
already decoded. The caller decodes a new list with h5py and checks it against these bytes once
(:class:`~sccoreset._io._nodes.SharedIndexes`), so a mistake here can only cost speed, never change a name.

Format: HDF5 file format specification 3.0, "Global Heap" (collection: ``GCOL``, version 1, 3 reserved
bytes, collection size; objects: index u16, reference count u16, 4 reserved bytes, size, data padded to
8 bytes; index 0 is the free space) and "Disk format of variable-length data" (length u32, collection
address, object index u32). Only files with 8-byte offsets and lengths, no userblock and the POSIX (sec2) driver are read here.
"""

from __future__ import annotations

import os

import h5py
import numba
import numpy as np

_HEADER = 16  # "GCOL", version, 3 reserved bytes, 8-byte collection size
_ELEMENT = np.dtype([("length", "<u4"), ("address", "<u8"), ("index", "<u4")])
MAX_COLLECTION = 1 << 30  # a collection larger than this is damage, not gene names


def heap_strings(dataset: h5py.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(byte length of every string, their bytes concatenated) of a 1-D variable-length string dataset.

    None when the fast path does not apply (chunked or filtered storage, another offset size, a userblock,
    a file not opened through the plain POSIX driver, a heap that does not parse or points outside the
    file): the caller then reads the dataset with h5py. The bytes are read through h5py's own descriptor,
    so they come from the file h5py has open.
    """
    try:
        if dataset.ndim != 1 or h5py.check_string_dtype(dataset.dtype) is None or dataset.dtype.kind != "O":
            return None
        if dataset.chunks is not None or dataset.id.get_create_plist().get_nfilters() > 0:
            return None
        file = dataset.file
        fcpl = file.id.get_create_plist()
        if file.driver != "sec2" or fcpl.get_sizes() != (8, 8) or fcpl.get_userblock() != 0:
            return None
        n = int(dataset.shape[0])
        offset = dataset.id.get_offset()
        if offset is None:
            return None if n else (np.zeros(0, np.int64), np.zeros(0, np.uint8))
        fd = int(file.id.get_vfd_handle())
        file_size = os.fstat(fd).st_size
        return _read_heap_strings(fd, file_size, n, int(offset))
    except Exception:  # noqa: BLE001 - anything unexpected: h5py reads the dataset (and reports damage)
        return None


def _read_heap_strings(fd: int, file_size: int, n: int, offset: int) -> tuple[np.ndarray, np.ndarray] | None:
    if offset < 0 or offset + n * _ELEMENT.itemsize > file_size:
        return None
    elements = np.frombuffer(_pread(fd, n * _ELEMENT.itemsize, offset), dtype=_ELEMENT)
    lengths = elements["length"].astype(np.int64)
    addresses = elements["address"]
    used = lengths > 0  # an empty string may carry no heap object
    runs = np.flatnonzero(np.diff(addresses)) + 1  # elements come in runs of one collection each
    firsts = addresses[np.concatenate(([0], runs))] if n else addresses[:0]
    wanted = np.unique(firsts[_run_used(used, runs)])
    collections, total = [], 0
    for address in wanted:
        collection = _read_collection(fd, int(address), file_size)
        if collection is None:
            return None
        total += collection.size
        if total > file_size:  # overlapping collections: damage
            return None
        collections.append(collection)
    heap = np.concatenate(collections) if collections else np.zeros(0, np.uint8)
    bases = np.cumsum([0] + [c.size for c in collections])
    which = np.searchsorted(wanted, addresses).astype(np.int64)
    starts = _resolve(heap, bases, which, elements["index"].astype(np.int64), lengths, len(collections))
    if starts is None:
        return None
    return lengths, _gather(heap, starts, lengths)


def _run_used(used: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Whether each run of elements holds a non-empty string."""
    if not used.size:
        return np.zeros(0, dtype=bool)
    return np.logical_or.reduceat(used, np.concatenate(([0], runs)))


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise OSError("end of file")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_collection(fd: int, address: int, file_size: int) -> np.ndarray | None:
    if address + _HEADER > file_size:
        return None
    header = _pread(fd, _HEADER, address)
    if header[:4] != b"GCOL" or header[4] != 1:
        return None
    size = int.from_bytes(header[8:16], "little")
    if not _HEADER <= size <= min(MAX_COLLECTION, file_size - address):
        return None
    return np.frombuffer(_pread(fd, size, address), dtype=np.uint8)


@numba.njit(nogil=True, cache=True)
def _u64(buf, at):
    v = np.uint64(0)
    for k in range(8):
        v |= np.uint64(buf[at + k]) << np.uint64(8 * k)
    return v


@numba.njit(nogil=True, cache=True)
def _scan_collection(heap, lo, hi, start, size, seen):
    """Record the objects of the collection ``heap[lo:hi]``: offset of their data in ``heap`` and size."""
    at = lo + 16
    n_seen = 0
    while at + 16 <= hi:
        index = np.int64(heap[at]) | (np.int64(heap[at + 1]) << 8)
        n = np.int64(_u64(heap, at + 8))
        if index == 0:  # free space: the rest of the collection
            return n_seen
        if n < 0 or n > hi - at - 16:  # written so that no sum can overflow
            return -1
        if index < start.size:  # objects beyond the table belong to no element
            if start[index] >= 0:
                return -1
            start[index] = at + 16
            size[index] = n
            seen[n_seen] = index
            n_seen += 1
        at += 16 + ((n + 7) // 8) * 8
    return n_seen


@numba.njit(nogil=True, cache=True)
def _resolve_kernel(heap, bases, which, index, lengths, out, max_scans):
    top = 1
    for e in range(index.size):
        top = max(top, index[e] + 1)
    if top > 1 << 16:
        return False
    start = np.full(top, -1, dtype=np.int64)
    size = np.zeros(top, dtype=np.int64)
    seen = np.empty(1 << 16, dtype=np.int64)
    current = -1
    n_seen = 0
    for e in range(index.size):
        if lengths[e] == 0:  # an empty string: no heap object needed
            continue
        c = which[e]
        if c != current:  # elements come in runs of one collection: scan each run's collection once
            for k in range(n_seen):
                if seen[k] < top:
                    start[seen[k]] = -1
            max_scans -= 1
            if max_scans < 0:
                return False
            n_seen = _scan_collection(heap, bases[c], bases[c + 1], start, size, seen)
            if n_seen < 0:
                return False
            current = c
        x = index[e]
        if x <= 0 or start[x] < 0 or size[x] != lengths[e]:
            return False
        out[e] = start[x]
    return True


def _resolve(heap, bases, which, index, lengths, n_collections):
    """Offset in ``heap`` of every element's bytes, or None when an element names no matching object.

    Elements that hop between collections more often than a well-formed file makes them (runs of one
    collection each, in order) are left to h5py rather than rescanned without bound.
    """
    out = np.zeros(lengths.size, dtype=np.int64)
    max_scans = 4 * n_collections + 16
    ok = _resolve_kernel(heap, np.asarray(bases, np.int64), which, index, lengths, out, max_scans)
    return out if ok else None


@numba.njit(nogil=True, cache=True)
def _gather(heap, starts, lengths):
    out = np.empty(lengths.sum(), dtype=np.uint8)
    pos = 0
    for i in range(lengths.size):
        s = starts[i]
        for k in range(lengths[i]):
            out[pos + k] = heap[s + k]
        pos += lengths[i]
    return out
