"""Chunks of the stream: row blocks read from disk, transformed onto the gene space, prefetched."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._io._blocks import CSRBlock, take_rows
from .._io._labels import MissingLabels, check_policy, missing_labels_error
from .._io._open_files import OpenFiles
from .._io._parallel import default_workers, ordered_map
from .._io._prefetch import prefetch as run_ahead
from .._io._recycle import ArrayRecycler
from .._io._sources import ReadBuffers, Source
from .._utils import check_positive
from ._chunk_plan import Segment
from ._gene_space import GeneSpace


@dataclass
class Chunk:
    """One chunk of the stream: features, labels and where every cell came from.

    Attributes
    ----------
    index
        Position of the chunk in the stream (0-based).
    X
        Float32 features on the gene space, ``(n_cells, n_genes)``.
    labels
        Labels from obs (strings), or None when no ``label_key`` was given; ``(n_cells, n_keys)`` when
        ``label_key`` is a list of keys.
    file_index
        Index into ``files`` of each cell's file.
    row
        Row of each cell in its file (the row in the file on disk, also for views of backed data;
        for an AnnData in memory, the row in that object).
    obs_names
        obs name of each cell in its file.
    files
        Display names of all files of the stream.
    read_seconds, transform_seconds
        Time spent reading from disk and transforming.
    n_skipped
        Cells of this chunk's rows left out because their label is missing.
    """

    index: int
    X: np.ndarray
    labels: np.ndarray | None
    file_index: np.ndarray
    row: np.ndarray
    obs_names: np.ndarray
    files: list[str] = field(repr=False)
    read_seconds: float = 0.0
    transform_seconds: float = 0.0
    n_skipped: int = 0

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class _RawChunk:
    """A chunk as read from disk: (file, CSR block) per segment (views of pooled buffers) and provenance."""

    index: int
    blocks: list[tuple[int, CSRBlock]]
    buffers: ReadBuffers
    labels: np.ndarray | None
    file_index: np.ndarray
    row: np.ndarray
    obs_names: np.ndarray
    read_seconds: float
    n_skipped: int = 0


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    if len(parts) == 1:
        return parts[0].astype(dtype, copy=False)
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)


class ChunkReader:
    """Reads planned chunks from a list of sources; keeps one column map per source.

    With ``n_workers > 1``, that many threads each read a whole chunk (positioned reads, GIL
    released) into their own pooled buffers and transform it (numba kernel in that thread, GIL
    released) into their own output array; chunks are delivered in order, and at most
    ``prefetch + n_workers`` chunks exist at a time besides the one the consumer holds. With
    ``n_workers=1``, reading and transforming are two pipeline stages, each in its own background
    thread. Output arrays are recycled once nobody references them.

    Parameters
    ----------
    sources
        The opened inputs.
    gene_space
        The fitted gene space the chunks are transformed onto.
    label_key
        obs column returned as ``chunk.labels``, or a list of columns (one per task; a cell missing any of
        them is missing).
    missing_labels
        ``"skip"`` or ``"error"``: see :func:`iter_chunks`.
    n_workers
        Reading threads (default: the CPUs this process may use, at most 8).
    pin_memory
        Allocate the chunks' ``X`` in page-locked memory when CUDA is available (for asynchronous
        copies to the GPU); ignored otherwise.
    obs_names
        Read each cell's obs name into ``chunk.obs_names``; with False they are left empty (None), which
        saves decoding strings under the GIL when provenance by file and row is enough.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        gene_space: GeneSpace,
        label_key: str | Sequence[str] | None = None,
        *,
        missing_labels: MissingLabels = "skip",
        n_workers: int | None = None,
        pin_memory: bool = False,
        obs_names: bool = True,
    ) -> None:
        check_policy(missing_labels)
        check_positive(n_workers=n_workers)
        self.sources = list(sources)
        self.gene_space = gene_space
        self.label_key = label_key
        self.missing_labels = missing_labels
        # decoding 10,000 obs names per chunk holds the GIL; the trainer finds names by (file, row) at the end
        self.with_obs_names = obs_names
        self.n_workers = default_workers() if n_workers is None else int(n_workers)
        self._col_maps: dict[int, np.ndarray] = {}
        self._col_lock = threading.Lock()
        self._outputs = ArrayRecycler(max_tracked=self.n_workers + 3, pin_memory=pin_memory)
        self._open = OpenFiles(self.sources)  # shuffled orders over thousands of files: a bounded number open

    @property
    def pin_memory(self) -> bool:
        """Whether output arrays are page-locked (asked for, and CUDA available)."""
        return self._outputs.pinned

    def col_map(self, f: int) -> np.ndarray:
        src = self.sources[f]
        key = id(src.var_names)  # files with the same genes share one Index object (and one map)
        with self._col_lock:
            if key not in self._col_maps:
                self._col_maps[key] = self.gene_space.column_map(src.var_names, source=src.name)
            return self._col_maps[key]

    @contextlib.contextmanager
    def _files_in_use(self, segments: Sequence[Segment]):
        """Hold the segments' files open while a chunk is read.

        Yields ``done(k, f)``, to call once segment ``k`` of file ``f`` is in memory: after a file's last
        segment of the chunk, the file may be closed.
        """
        pending = {f for f, _, _ in segments}
        last = {f: k for k, (f, _, _) in enumerate(segments)}
        self._open.begin(pending)

        def done(k: int, f: int) -> None:
            if last[f] == k:
                pending.discard(f)
                self._open.end([f])

        try:
            yield done
        finally:
            self._open.end(pending)

    def read_raw(self, index: int, segments: Sequence[Segment], buffers: ReadBuffers) -> _RawChunk:
        """Read the segments' rows; cells with a missing label are dropped here (skip) or raise (error)."""
        with self._files_in_use(segments) as done:
            return self._read_raw(index, segments, buffers, done)

    def _read_raw(self, index: int, segments: Sequence[Segment], buffers: ReadBuffers, done) -> _RawChunk:
        t0 = time.perf_counter()
        buffers.reset()
        blocks, file_index, rows, names, labels = [], [], [], [], []
        n_skipped = 0
        for k, (f, start, stop) in enumerate(segments):
            src = self.sources[f]
            block = src.read_rows(start, stop, buffers)
            seg_rows, seg_names, seg_labels, keep = self._segment_meta(src, start, stop)
            if keep is not None:
                n_skipped += int(keep.size - keep.sum())
                block = take_rows(block, keep)
            if seg_labels is not None:
                labels.append(seg_labels)
            blocks.append((f, block))
            rows.append(seg_rows)
            names.append(seg_names)
            file_index.append(np.full(seg_rows.size, f, dtype=np.int32))
            done(k, f)
        return _RawChunk(
            index, blocks, buffers, _cat(labels, object) if self.label_key is not None else None,
            _cat(file_index, np.int32), _cat(rows, np.int64), _cat(names, object), time.perf_counter() - t0, n_skipped,
        )  # fmt: skip

    def _segment_meta(self, src: Source, start: int, stop: int):
        """Rows ``[start, stop)``: file rows, obs names and labels of the cells kept, and the keep mask.

        The mask is None when every cell is kept; cells missing a label are dropped (skip) or raise (error).
        """
        seg_rows = src.physical_rows(start, stop)
        seg_names = src.read_obs_names(start, stop) if self.with_obs_names else np.full(seg_rows.size, None)
        if self.label_key is None:
            return seg_rows, seg_names, None, None
        seg_labels, missing, key = self._read_labels(src, start, stop)
        if not missing.any():
            return seg_rows, seg_names, seg_labels, None
        if self.missing_labels == "error":
            raise missing_labels_error(src, key, missing, seg_rows)
        keep = ~missing
        return seg_rows[keep], seg_names[keep], seg_labels[keep], keep

    def read_transformed(
        self, index: int, segments: Sequence[Segment], buffers: ReadBuffers, *, parallel: bool = False
    ) -> Chunk:
        """Read and transform one chunk in the calling thread, a block of rows at a time.

        Each block of at most 2**20 stored values (8 MiB, :meth:`Source.iter_row_blocks`) is transformed as
        soon as it is read, so a reading thread holds one block instead of a whole chunk's counts (about
        180 MB for 10,000 cells of 2,200 stored values each). Smaller blocks pay more Python (and GIL) per
        value: with 16 threads, blocks of 2**17 values read at two thirds of the speed of 2**20.
        """
        with self._files_in_use(segments) as done:
            t0 = time.perf_counter()
            metas = [self._segment_meta(self.sources[f], start, stop) for f, start, stop in segments]
            X = self._outputs.empty((sum(m[0].size for m in metas), self.gene_space.n_genes))
            transform_seconds, pos = 0.0, 0
            for k, ((f, start, stop), (seg_rows, _, _, keep)) in enumerate(zip(segments, metas, strict=True)):
                src = self.sources[f]
                col_map = self.col_map(f)
                if keep is None:  # each block reuses buffers from their start
                    parts = contextlib.closing(src.iter_row_blocks(start, stop, buffers))
                else:  # cells without a label: the segment whole, then its labelled rows
                    buffers.reset()  # the segment before is transformed: its buffer space is free again
                    parts = contextlib.nullcontext([(0, take_rows(src.read_rows(start, stop, buffers), keep))])
                with parts as blocks:
                    for r0, block in blocks:
                        t1 = time.perf_counter()
                        at = pos + r0
                        self.gene_space._transform_into(
                            block.data, block.indices, block.indptr, col_map, X[at : at + block.n_rows], src.name,
                            0, seg_rows[r0 : r0 + block.n_rows], src.matrix_name, parallel,
                        )  # fmt: skip
                        transform_seconds += time.perf_counter() - t1
                pos += seg_rows.size
                done(k, f)
        labels = [m[2] for m in metas]
        n_skipped = sum(0 if m[3] is None else int(m[3].size - m[3].sum()) for m in metas)
        return Chunk(
            index, X, _cat(labels, object) if self.label_key is not None else None,
            _cat([np.full(m[0].size, f, dtype=np.int32) for (f, _, _), m in zip(segments, metas, strict=True)],
                 np.int32),
            _cat([m[0] for m in metas], np.int64), _cat([m[1] for m in metas], object), [s.name for s in self.sources],
            time.perf_counter() - t0 - transform_seconds, transform_seconds, n_skipped,
        )  # fmt: skip

    def _read_labels(self, src: Source, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Labels of rows ``[start, stop)``, their missing mask and the key of the first missing value."""
        if isinstance(self.label_key, str):
            values, missing = src.read_labels(self.label_key, start, stop)
            return values, missing, self.label_key
        cols = [src.read_labels(k, start, stop) for k in self.label_key]
        missing = np.logical_or.reduce([m for _, m in cols])
        first = next((k for k, (_, m) in zip(self.label_key, cols, strict=True) if m.any()), self.label_key[0])
        return np.stack([v for v, _ in cols], 1), missing, first

    def transform(self, raw: _RawChunk, *, parallel: bool = True) -> Chunk:
        t0 = time.perf_counter()
        X = self._outputs.empty((raw.file_index.size, self.gene_space.n_genes))
        pos = 0
        for f, block in raw.blocks:
            n = block.n_rows
            src = self.sources[f]
            self.gene_space.transform_csr(
                block.data, block.indices, block.indptr, self.col_map(f), source=src.name,
                out=X[pos : pos + n], rows=raw.row[pos : pos + n], what=src.matrix_name, parallel=parallel,
            )  # fmt: skip
            pos += n
        files = [s.name for s in self.sources]
        return Chunk(
            raw.index, X, raw.labels, raw.file_index, raw.row, raw.obs_names, files, raw.read_seconds,
            time.perf_counter() - t0, raw.n_skipped,
        )  # fmt: skip

    def read(self, index: int, segments: Sequence[Segment]) -> Chunk:
        """Read and transform one chunk in the calling thread."""
        return self.read_transformed(index, segments, ReadBuffers(), parallel=True)

    def iterate(self, plan: Sequence[Sequence[Segment]], *, start: int = 0, prefetch: int = 1) -> Iterator[Chunk]:
        """Chunks ``start, start + 1, ...`` of ``plan``, in order, read ahead in background threads.

        ``prefetch=0`` reads in the calling thread. Otherwise ``n_workers`` threads read and transform
        up to ``prefetch + n_workers`` chunks ahead (``n_workers=1``: a reading and a transforming
        thread, ``prefetch`` chunks ahead). A file is closed once its last chunk has been read.
        """
        if prefetch <= 0:
            buffers = ReadBuffers()
            for i in range(start, len(plan)):
                yield self.read_transformed(i, plan[i], buffers, parallel=True)
            return
        self._outputs.max_tracked = max(self._outputs.max_tracked, prefetch + self.n_workers + 2)
        if self.n_workers > 1:
            yield from self._iterate_parallel(plan, start, prefetch)
            return
        last_use = {f: i for i, chunk in enumerate(plan) for f, _, _ in chunk}
        # two read buffers: one being filled while the other is transformed
        pool: queue.Queue[ReadBuffers] = queue.Queue()
        for _ in range(2):
            pool.put(ReadBuffers())
        stopped = threading.Event()

        def free_buffers() -> ReadBuffers:
            while not stopped.is_set():
                try:
                    return pool.get(timeout=0.1)
                except queue.Empty:
                    continue
            raise GeneratorExit

        def read_all() -> Iterator[_RawChunk]:
            for i in range(start, len(plan)):
                raw = self.read_raw(i, plan[i], free_buffers())
                for f in {f for f, _, _ in plan[i]}:
                    if last_use[f] == i:  # keep few files open on long streams
                        self._open.close(f)
                yield raw

        def transform_all() -> Iterator[Chunk]:
            # one transform thread next to the reading thread: two busy threads on two cores
            try:
                for raw in run_ahead(read_all, depth=1):
                    try:
                        chunk = self.transform(raw, parallel=False)
                    finally:
                        pool.put(raw.buffers)
                    del raw
                    yield chunk
            finally:
                stopped.set()  # a reader waiting for buffers gives up

        try:
            yield from run_ahead(transform_all, depth=prefetch)
        finally:
            stopped.set()

    def _iterate_parallel(self, plan: Sequence[Sequence[Segment]], start: int, prefetch: int) -> Iterator[Chunk]:
        files_of = {i: {f for f, _, _ in plan[i]} for i in range(start, len(plan))}
        remaining = Counter(f for files in files_of.values() for f in files)
        lock = threading.Lock()

        def one(i: int, buffers: ReadBuffers) -> Chunk:
            try:
                return self.read_transformed(i, plan[i], buffers)
            finally:
                with lock:
                    remaining.subtract(files_of[i])
                    done = [f for f in files_of[i] if remaining[f] == 0]
                for f in done:  # every chunk of it read: keep few files open on long streams
                    self._open.close(f)

        yield from ordered_map(
            one, range(start, len(plan)), n_workers=self.n_workers, depth=prefetch, state=ReadBuffers,
            name="sccoreset-reader",
        )  # fmt: skip
