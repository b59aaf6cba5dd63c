"""`pp.iter_chunks`: stream files as model-ready chunks, read in parallel threads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .._io._checks import warn_if_not_counts
from .._io._labels import MissingLabels, check_policy, count_missing_labels
from .._io._sources import open_sources
from .._utils import RandomState, as_rng, check_positive
from ._chunk_plan import Order, plan_chunks
from ._chunks import Chunk, ChunkReader
from ._gene_space import GeneSpace


def iter_chunks(
    files: Sequence[Any] | Any,
    gene_space: GeneSpace,
    *,
    chunk_size: int = 10_000,
    label_key: str | None = None,
    order: Order = "sequential",
    block_size: int | None = None,
    prefetch: int = 1,
    random_state: RandomState = 0,
    mod: str | None = None,
    layer: str | None = None,
    missing_labels: MissingLabels = "skip",
    n_workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[Chunk]:
    """Stream the files as chunks of at most ``chunk_size`` cells, transformed onto ``gene_space``.

    Row blocks are read straight from the CSR arrays on disk (one contiguous slice per block,
    never the whole file); ``n_workers`` background threads read and transform the chunks ahead
    while the caller works on the current one, and deliver them in order.

    Parameters
    ----------
    files
        Paths to ``.h5ad`` / ``.h5mu`` files or anndata ``.zarr`` stores, or AnnData / MuData objects
        (in memory or backed; views of backed objects are read through their rows).
    gene_space
        The fitted :class:`~sccoreset.pp.GeneSpace` (see :func:`~sccoreset.pp.fit_gene_space`).
    chunk_size
        Cells per chunk (the last chunk may be smaller). Chunks span file boundaries.
    label_key
        obs column to return as ``chunk.labels``.
    order
        ``"sequential"``: files and rows in order (best I/O locality).
        ``"block_shuffle"``: blocks of ``block_size`` rows from all files shuffled into chunks
        (scDataset-style), closer to i.i.d. chunks at the cost of more, smaller reads.
    block_size
        Rows per block for ``"block_shuffle"`` (default ``min(chunk_size // 8, 1024)``).
    prefetch
        Chunks read ahead in the background (0: read in the calling thread). With ``n_workers``
        threads, at most ``prefetch + n_workers`` chunks are read ahead (each ``chunk_size`` ×
        ``gene_space.n_genes`` float32 values: 80 MB for 10,000 cells and 2,000 genes).
    random_state
        Seed of the block order.
    mod
        Modality to read from MuData inputs.
    layer
        Read counts from ``layers[layer]`` instead of ``X``.
    missing_labels
        Cells whose ``label_key`` value is missing (NaN/None): ``"skip"`` leaves them out of the
        chunks (counted in ``chunk.n_skipped``, with one warning per stream counting them per file;
        chunks are then smaller than ``chunk_size``); ``"error"`` raises before the first chunk.
    n_workers
        Threads reading and transforming chunks in parallel (default: the CPUs this process may
        use, at most 8). Chunks come in the same order, with the same values, whatever the number.
    pin_memory
        Page-locked ``chunk.X`` when CUDA is available, for asynchronous copies to the GPU.

    Yields
    ------
    :class:`~sccoreset.pp.Chunk` objects with features, labels and provenance.
    """
    check_positive(chunk_size=chunk_size, block_size=block_size)
    check_policy(missing_labels)
    with open_sources(files, mod=mod, layer=layer) as sources:
        reader = ChunkReader(
            sources, gene_space, label_key, missing_labels=missing_labels, n_workers=n_workers, pin_memory=pin_memory
        )
        warn_if_not_counts(sources)
        for f in range(len(sources)):  # alignment and label errors before the first chunk
            reader.col_map(f)
        if label_key is not None:
            count_missing_labels(sources, label_key, missing_labels, stacklevel=3)
        plan = plan_chunks(
            [s.n_obs for s in sources], chunk_size, order=order, block_size=block_size, rng=as_rng(random_state)
        )
        chunks = reader.iterate(plan, prefetch=prefetch)
        try:
            for chunk in chunks:
                if len(chunk):  # a chunk whose cells all lack a label is not yielded
                    yield chunk
        finally:  # a consumer that stops early: the reading threads end before the files close
            chunks.close()
