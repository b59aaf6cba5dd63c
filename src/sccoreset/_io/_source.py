"""A :class:`Source`: one input of the stream, read in row blocks without loading its matrix.

A source knows its display name (used in every error message), its gene names, its number of
cells and how to read obs columns and blocks of rows of its counts matrix (``X`` or a layer) as
CSR arrays. Rows are *logical* (``0 .. n_obs - 1``); for a view of a file, :attr:`Source.rows`
maps them to the *physical* rows of the file, which is what provenance records.

Several reading threads may share a source. h5py holds the GIL and one file handle is not safe to
read from several threads at once, so everything that goes through h5py or zarr (opening, indptr,
obs columns, compressed data) is serialised by a lock per source; the positioned reads of
uncompressed data and indices (``_direct.py``) run outside it, in parallel, without the GIL.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from anndata import AnnData

from .._errors import InputError
from .._utils import logger
from ._blocks import CSRBlock, ReadBuffers, block_from_matrix, concat_blocks, empty_block, runs, take_rows
from ._direct import DirectDataset
from ._nodes import (
    close_store,
    column_length,
    is_group,
    open_store,
    read_column,
    read_elem,
    read_slice_into,
    series_column,
)
from ._obs_rows import UnsupportedEncoding, read_obs_rows

SPAN_DENSITY = 32  # read a whole span when the wanted rows are at least 1 in 32 of it
SUB_BLOCK_NNZ = 1 << 20  # values per block of iter_row_blocks: data and indices take about 8 MiB
POINTER_SPAN = 1 << 20  # scattered rows: one indptr read for spans up to this many rows (8 MiB), else per run


def _hint(e: BaseException) -> str:
    """What a failed read most likely means."""
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        return "the process has too many files open (raise `ulimit -n`)"
    return "is the file truncated?"


@dataclass
class Source:
    """One input of the stream: a file or zarr store (``path``) or an AnnData in memory (``adata``).

    ``rows`` (optional) are the file rows of a view: logical row ``i`` is file row ``rows[i]``.
    ``layer`` reads counts from ``layers/<layer>`` instead of ``X``.
    """

    name: str
    n_obs: int
    var_names: pd.Index
    path: Path | None = None
    mod: str | None = None
    adata: AnnData | None = None
    layer: str | None = None
    rows: np.ndarray | None = None
    _handle: Any = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _direct: dict | None = field(default=None, repr=False)
    #: the first rows' first non-whole value (None: all whole), read when the file was first opened
    peek_non_integer: float | None = field(default=None, repr=False)
    peeked: bool = field(default=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _categorical: dict = field(default_factory=dict, repr=False)  # obs key -> (codes of every file row, categories)
    #: positioned reads running outside the lock; a close asked for meanwhile waits for the last of them
    _busy: int = field(default=0, repr=False)
    _close_pending: bool = field(default=False, repr=False)

    # -- layout -----------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"mod/{self.mod}/" if self.mod is not None else ""

    @property
    def matrix_name(self) -> str:
        """Where the counts are read from, for messages: ``X`` or ``layers/<layer>``."""
        return "X" if self.layer is None else f"layers/{self.layer}"

    def physical_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """File rows of logical rows ``[start, stop)``."""
        stop = self.n_obs if stop is None else stop
        if self.rows is None:
            return np.arange(start, stop, dtype=np.int64)
        return self.rows[start:stop].copy()

    def _runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        if self.rows is None:
            return [(start, stop)] if stop > start else []
        return runs(self.rows[start:stop])

    def _file(self) -> Any:
        with self._lock:
            self._close_pending = False  # wanted again: a deferred close is off
            if self._handle is None or (isinstance(self._handle, h5py.File) and not self._handle.id.valid):
                if not self.path.exists():
                    raise InputError(f"{self.name}: file no longer exists (it was there when the stream was scanned).")
                self._handle = open_store(self.path, self.name)
            return self._handle

    def _matrix(self) -> Any:
        return self._file()[f"{self.prefix}{self.matrix_name}"]

    @property
    def is_open(self) -> bool:
        """Whether the file is open now (it opens on its first read)."""
        return self._handle is not None

    def close(self) -> None:
        """Close the file (it reopens when read again); deferred while positioned reads still use it."""
        with self._lock:
            if self._busy:
                self._close_pending = True
                return
            self._close_pending = False
            if self._handle is not None:
                close_store(self._handle)
            self._handle = None
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
            self._direct = None

    def _direct_readers(self, x: Any) -> tuple[DirectDataset, DirectDataset] | None:
        """GIL-free readers of data and indices, when stored in HDF5 without filters and checked against h5py."""
        if self._direct is None:
            self._direct = {"readers": None}
            if isinstance(x, h5py.Group):
                data, indices = DirectDataset(x["data"]), DirectDataset(x["indices"])
                if data.usable and indices.usable:
                    self._fd = os.open(self.path, os.O_RDONLY)
                    if data.verify(self._fd, x["data"]) and indices.verify(self._fd, x["indices"]):
                        self._direct["readers"] = (data, indices)
                    else:  # e.g. chunk addresses that ignore the userblock (HDF5 < 1.14.4, .h5mu files)
                        logger.debug(f"{self.name}: positioned reads disagree with h5py; reading through h5py")
                        os.close(self._fd)
                        self._fd = None
        return self._direct["readers"]

    # -- obs --------------------------------------------------------------------------------
    def obs_columns(self) -> list[str]:
        if self.adata is not None:
            return list(self.adata.obs.columns)
        with self._lock:
            group = self._file()[f"{self.prefix}obs"]
            return [k for k in group.keys() if k != group.attrs.get("_index", "_index")]

    def read_labels(self, key: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Obs column ``key`` for logical rows ``[start, stop)``: (str values, None where missing; missing mask)."""
        stop = self.n_obs if stop is None else stop
        if self.adata is not None:
            if key not in self.adata.obs.columns:
                raise self._missing_column(key)
            return series_column(self.adata.obs[key].iloc[start:stop])
        cached = self._categorical.get(key)
        if cached is None:
            with self._lock:
                group = self._file()[f"{self.prefix}obs"]
                if key not in group:
                    raise self._missing_column(key)
                node = group[key]
                if not (is_group(node) and node.attrs.get("encoding-type", "") == "categorical"):
                    return self._read_runs(node, start, stop, f"{self.name}: obs column {key!r}")
                # the codes of a whole file are small (1 byte a cell, mostly): read once, sliced per chunk
                what = f"{self.name}: obs column {key!r}"
                cats, _ = read_column(node["categories"], 0, column_length(node["categories"]), what)
                cached = self._categorical[key] = (np.asarray(node["codes"][:]), cats)
        codes, cats = cached
        codes = codes[start:stop] if self.rows is None else codes[self.rows[start:stop]]
        missing = codes < 0
        out = np.empty(codes.size, dtype=object)
        out[~missing] = cats[codes[~missing]]
        return out, missing

    def read_obs_column(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of obs column ``key`` for logical rows ``[start, stop)`` (None where missing)."""
        return self.read_labels(key, start, stop)[0]

    def read_obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_obs if stop is None else stop
        if self.adata is not None:
            return self.adata.obs_names[start:stop].to_numpy(dtype=object)
        with self._lock:
            group = self._file()[f"{self.prefix}obs"]
            node = group[group.attrs.get("_index", "_index")]
            return self._read_runs(node, start, stop, f"{self.name}: obs index")[0]

    def _read_runs(self, node: Any, start: int, stop: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_column(node, lo, hi, what) for lo, hi in self._runs(start, stop)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, dtype=object), np.zeros(0, dtype=bool)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def read_obs(self, rows: np.ndarray) -> pd.DataFrame:
        """The full obs rows ``rows`` (physical file rows, sorted, unique) of this source."""
        if self.adata is not None:
            return self.adata.obs.iloc[rows].copy()
        with self._lock:
            group = self._file()[f"{self.prefix}obs"]
            try:
                return read_obs_rows(group, rows)  # just these rows, column by column
            except UnsupportedEncoding:
                obs = read_elem(group)
        return obs.iloc[rows].copy()

    def _missing_column(self, key: str) -> InputError:
        cols = self.obs_columns()
        shown = ", ".join(map(repr, cols[:20])) + (" ..." if len(cols) > 20 else "")
        return InputError(f"{self.name}: obs has no column {key!r} (columns: {shown or 'none'}).")

    # -- counts -----------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int, buffers: ReadBuffers | None = None) -> CSRBlock:
        """Logical rows ``[start, stop)`` of the counts as CSR arrays: one contiguous read per run of file rows.

        With ``buffers``, data and indices of a single run are read straight into (views of) those
        reused arrays, which avoids allocating and faulting in fresh memory for every block.
        """
        if self.adata is not None:
            m = self.adata.X if self.layer is None else self.adata.layers[self.layer]
            return block_from_matrix(m[start:stop])
        parts = self._runs(start, stop)
        if len(parts) == 1:
            return self._read_file_rows(*parts[0], buffers)
        return concat_blocks([self._read_file_rows(lo, hi) for lo, hi in parts])

    def _read_file_rows(self, start: int, stop: int, buffers: ReadBuffers | None = None) -> CSRBlock:
        what = self.matrix_name
        try:
            with self._lock:  # h5py: one thread at a time per file
                x = self._matrix()
                if not is_group(x):
                    return block_from_matrix(x[start:stop])
                ptr = np.asarray(x["indptr"][start : stop + 1])
                lo, hi = int(ptr[0]), int(ptr[-1])
                if hi > x["data"].shape[0] or hi > x["indices"].shape[0] or lo > hi or lo < 0:
                    raise InputError(
                        f"{self.name}: {what} is truncated (rows {start}-{stop} point past the stored data)."
                    )
                direct = None
                if buffers is None:
                    data = np.asarray(x["data"][lo:hi])
                    indices = np.asarray(x["indices"][lo:hi])
                else:
                    data, indices = buffers.take(hi - lo, x["data"].dtype, x["indices"].dtype)
                    direct = self._direct_readers(x)
                    fd = self._fd
                    if direct is None:
                        read_slice_into(x["data"], lo, hi, data)
                        read_slice_into(x["indices"], lo, hi, indices)
                    else:
                        self._busy += 1  # a close() meanwhile waits for these reads
            if direct is not None:  # positioned reads release the GIL, and run in parallel outside the lock
                try:
                    direct[0].read_into(fd, lo, hi, data)
                    direct[1].read_into(fd, lo, hi, indices)
                finally:
                    self._reads_done()
        except InputError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise InputError(f"{self.name}: cannot read rows {start}-{stop} of {what} ({e}); {_hint(e)}") from e
        return CSRBlock(data, indices, (ptr - lo).astype(np.int64, copy=False))

    def iter_row_blocks(
        self, start: int, stop: int, buffers: ReadBuffers, block_nnz: int | None = None
    ) -> Iterator[tuple[int, CSRBlock]]:
        """Logical rows ``[start, stop)`` as consecutive CSR blocks ``(first row - start, block)``.

        Where positioned reads apply (an uncompressed CSR group of a file, one run of rows), the rows come
        in blocks of at most ``block_nnz`` stored values (default ``SUB_BLOCK_NNZ``; more only for a single
        row), each read into the same reused part of ``buffers``: a caller that consumes every block before
        asking for the next needs a buffer of one block (8 MiB) instead of a whole chunk's rows (about 180 MB
        for 10,000 cells), which is cheaper to fault in and stays warmer in the CPU's caches. Elsewhere all
        rows come as one block (:meth:`read_rows`).
        Every block reuses ``buffers`` from its start: a block's arrays are overwritten by the next one.
        """
        block_nnz = SUB_BLOCK_NNZ if block_nnz is None else block_nnz
        if stop <= start:
            return
        pieces = self._runs(start, stop)
        if self.adata is not None or len(pieces) != 1:
            buffers.reset()
            yield 0, self.read_rows(start, stop, buffers)
            return
        (first, last), what = pieces[0], self.matrix_name
        try:
            with self._lock:
                x = self._matrix()
                direct = self._direct_readers(x) if is_group(x) else None
                if direct is None:
                    ptr = None
                else:
                    ptr = np.asarray(x["indptr"][first : last + 1], dtype=np.int64)
                    n_stored = min(x["data"].shape[0], x["indices"].shape[0])
                    if ptr.size != last - first + 1 or ptr[0] < 0 or ptr[-1] > n_stored or (np.diff(ptr) < 0).any():
                        ptr = None  # a corrupt indptr: read whole, where the errors name the file and row
                    else:
                        fd = self._fd
                        self._busy += 1  # a close() meanwhile waits for these reads
        except InputError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise InputError(f"{self.name}: cannot read rows {first}-{last} of {what} ({e}); {_hint(e)}") from e
        if ptr is None:  # h5py reads (compressed data, zarr, dense) or a corrupt indptr: one block
            buffers.reset()
            yield 0, self._read_file_rows(first, last, buffers)
            return
        try:
            n, r0 = ptr.size - 1, 0
            while r0 < n:  # the most rows holding at most block_nnz values, at least one row
                r1 = max(r0 + 1, int(np.searchsorted(ptr, ptr[r0] + block_nnz, side="right")) - 1)
                lo, hi = int(ptr[r0]), int(ptr[r1])
                buffers.reset()
                data, indices = buffers.take(hi - lo, direct[0].dtype, direct[1].dtype)
                try:
                    direct[0].read_into(fd, lo, hi, data)
                    direct[1].read_into(fd, lo, hi, indices)
                except OSError as e:
                    raise InputError(
                        f"{self.name}: cannot read rows {first + r0}-{first + r1} of {what} ({e}); {_hint(e)}"
                    ) from e
                yield r0, CSRBlock(data, indices, ptr[r0 : r1 + 1] - lo)
                r0 = r1
        finally:
            self._reads_done()

    def _reads_done(self) -> None:
        """Positioned reads started under ``_busy`` are over: a close asked for meanwhile happens now."""
        with self._lock:
            self._busy -= 1
            if not self._busy and self._close_pending:
                self.close()

    def _read_runs_direct(self, pieces: list[tuple[int, int]]) -> CSRBlock | None:
        """Runs ``[lo, hi)`` of file rows of a CSR group by positioned reads (None where h5py must read).

        One indptr read for the whole span (one per run where the span is long), then one read of data and
        one of indices per run. Everything happens under the source's lock, so a reading thread closing
        the file cannot pull the descriptor away mid-read.
        """
        what = self.matrix_name
        first, last = pieces[0][0], pieces[-1][1]
        try:
            with self._lock:
                x = self._matrix()
                if not is_group(x) or "indptr" not in x:
                    return None
                direct = self._direct_readers(x)
                if direct is None:
                    return None
                ptrs = self._run_pointers(x["indptr"], pieces)
                n_stored = min(x["data"].shape[0], x["indices"].shape[0])
                lo = np.array([p[0] for p in ptrs], dtype=np.int64)
                hi = np.array([p[-1] for p in ptrs], dtype=np.int64)
                if (lo > hi).any() or (lo < 0).any() or (hi > n_stored).any():
                    raise InputError(
                        f"{self.name}: {what} is truncated (rows {first}-{last - 1} point past the stored data)."
                    )
                out_pos = np.concatenate([[0], np.cumsum(hi - lo)])
                data = np.empty(int(out_pos[-1]), dtype=direct[0].dtype)
                indices = np.empty(int(out_pos[-1]), dtype=direct[1].dtype)
                for k in range(len(pieces)):
                    direct[0].read_into(self._fd, int(lo[k]), int(hi[k]), data[out_pos[k] : out_pos[k + 1]])
                    direct[1].read_into(self._fd, int(lo[k]), int(hi[k]), indices[out_pos[k] : out_pos[k + 1]])
        except InputError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
            raise InputError(f"{self.name}: cannot read rows {first}-{last - 1} of {what} ({e}); {_hint(e)}") from e
        # the rows' own pointers, shifted to where their run starts in the output
        indptr = [np.zeros(1, dtype=np.int64)]
        indptr += [p[1:] - lo[k] + out_pos[k] for k, p in enumerate(ptrs)]
        return CSRBlock(data, indices, np.concatenate(indptr))

    def _run_pointers(self, node: Any, pieces: list[tuple[int, int]]) -> list[np.ndarray]:
        """``indptr[lo : hi + 1]`` of every run (a short ``indptr`` is an error naming the file).

        One read of the whole span when it is short (``POINTER_SPAN`` rows), else one read per run.
        """
        first, last = pieces[0][0], pieces[-1][1]
        if last - first <= POINTER_SPAN:
            span = np.asarray(node[first : last + 1], dtype=np.int64)
            parts = [span[a - first : b - first + 1] for a, b in pieces]
        else:
            parts = [np.asarray(node[a : b + 1], dtype=np.int64) for a, b in pieces]
        if any(p.size != b - a + 1 for p, (a, b) in zip(parts, pieces, strict=True)):
            raise InputError(f"{self.name}: {self.matrix_name}/indptr is shorter than its rows; is the file truncated?")
        return parts

    def read_rows_at(self, rows: np.ndarray) -> CSRBlock:
        """Arbitrary sorted physical (file) rows: one contiguous read per run of neighbouring rows.

        Scattered rows that are dense enough in their span (at least 1 in ``SPAN_DENSITY``) are read as
        the whole span in one slice and picked from it: one large read beats hundreds of tiny ones.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return empty_block()
        if self.adata is not None:
            m = self.adata.X if self.layer is None else self.adata.layers[self.layer]
            return block_from_matrix(m[rows])
        pieces = runs(rows)
        if len(pieces) > 1:
            scattered = self._read_runs_direct(pieces)
            if scattered is not None:
                return scattered
        span = int(rows[-1]) - int(rows[0]) + 1
        if len(pieces) > 8 and span <= SPAN_DENSITY * rows.size:
            block = self._read_file_rows(int(rows[0]), int(rows[-1]) + 1)
            keep = np.zeros(span, dtype=bool)
            keep[rows - rows[0]] = True
            return take_rows(block, keep)
        return concat_blocks([self._read_file_rows(lo, hi) for lo, hi in pieces])
