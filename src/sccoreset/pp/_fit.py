"""One streaming pass over all files: per-gene statistics, highly variable genes, the fitted GeneSpace."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._errors import InputError
from .._io._checks import warn_if_not_counts
from .._io._kernels import bad_row_message, csr_accumulate
from .._io._open_files import OpenFiles
from .._io._parallel import default_workers, ordered_map
from .._io._sources import ReadBuffers, Source, open_sources
from .._utils import RandomState, as_rng, check_positive, logger
from ._chunk_plan import plan_chunks
from ._gene_space import GeneSpace
from ._hvg import seurat_dispersions, top_genes
from ._scan import gene_union

_READ_ROWS = 8192


def _sampled_plan(sources: Sequence[Source], max_cells: int | None, rng: np.random.Generator) -> list:
    n_obs = [s.n_obs for s in sources]
    if max_cells is None or max_cells >= sum(n_obs):
        return plan_chunks(n_obs, _READ_ROWS)
    block = int(min(1024, max(32, max_cells // 16)))
    plan = plan_chunks(n_obs, block, order="block_shuffle", block_size=block, rng=rng)
    taken, total = [], 0
    for chunk in plan:
        if total >= max_cells:
            break
        taken.append(chunk)
        total += sum(stop - start for _, start, stop in chunk)
    return taken


def accumulate_statistics(
    sources: Sequence[Source],
    genes: pd.Index,
    *,
    target_sum: float,
    max_cells: int | None = None,
    random_state: RandomState = 0,
    progress: bool = False,
    n_workers: int | None = None,
) -> tuple[np.ndarray, int]:
    """Sums over cells of x, x², log1p(x), log1p(x)² of normalized counts for every gene in ``genes``.

    ``n_workers`` threads each read a block of rows (positioned reads) into their own buffers and sum
    its statistics into a fresh float64 array; the consumer adds the blocks' sums in block order, so
    the result is the same, bit for bit, whatever the number of workers. Returns the (4, n_genes) float64
    sums and the number of cells read.
    """
    col_maps = [genes.get_indexer(s.var_names).astype(np.int32) for s in sources]
    plan = _sampled_plan(sources, max_cells, as_rng(random_state))
    sums = np.zeros((len(genes), 4), dtype=np.float64)  # gene-major: one cache line per element
    n_workers = default_workers() if n_workers is None else n_workers
    blocks = [seg for chunk in plan for seg in chunk]
    remaining = Counter(f for f, _, _ in blocks)
    lock = threading.Lock()
    open_files = OpenFiles(sources)  # a sampled plan visits files in random order: a bounded number open

    def one(seg: tuple[int, int, int], buffers: ReadBuffers) -> tuple[np.ndarray, int]:
        f, start, stop = seg
        src = sources[f]
        open_files.begin([f])
        try:
            buffers.reset()
            block = src.read_rows(start, stop, buffers)
        finally:
            open_files.end([f])
            with lock:
                remaining[f] -= 1
                last = remaining[f] == 0
            if last:  # keep few files open on long streams
                open_files.close(f)
        acc = np.zeros_like(sums)
        bad = np.zeros(block.n_rows, dtype=np.uint8)
        if csr_accumulate(block.data, block.indices, block.indptr, col_maps[f], target_sum, acc, bad):
            rows = src.physical_rows(start, start + block.n_rows)
            raise InputError(bad_row_message(bad, rows, 0, src.name, src.matrix_name))
        return acc, block.n_rows

    n_cells = 0
    total = sum(stop - start for _, start, stop in blocks)
    results = ordered_map(one, blocks, n_workers=n_workers, depth=1, state=ReadBuffers, name="sccoreset-fit")
    with tqdm(total=total, desc="gene statistics", unit="cells", disable=not progress) as bar:
        for acc, n in results:
            sums += acc
            n_cells += n
            bar.update(n)
    return np.ascontiguousarray(sums.T), n_cells


def fit_gene_space(
    files: Sequence[Any] | Any,
    *,
    n_top_genes: int = 2000,
    gene_list: Sequence[str] | None = None,
    target_sum: float = 1e4,
    max_value: float = 10.0,
    max_cells: int | None = None,
    random_state: RandomState = 0,
    mod: str | None = None,
    layer: str | None = None,
    progress: bool = False,
    n_workers: int | None = None,
) -> GeneSpace:
    """Fit the global gene list and scaling statistics in one streaming pass over the files.

    Per-gene sums and sums of squares of normalized counts and of their log1p are accumulated
    chunk by chunk, in memory that does not grow with the number of cells. Highly variable genes
    are ranked as ``scanpy.pp.highly_variable_genes(flavor="seurat", n_top_genes=...)`` ranks them on
    the log1p-normalized concatenation of all files (missing genes counted as zeros): same means,
    dispersions, 20 mean bins and normalized dispersions.

    Parameters
    ----------
    files
        Paths to ``.h5ad`` / ``.h5mu`` files, or AnnData / MuData objects.
    n_top_genes
        Number of highly variable genes to keep (ignored when ``gene_list`` is given).
    gene_list
        Use these genes, in this order, instead of selecting highly variable genes.
    target_sum
        Counts per cell after normalization.
    max_value
        Clip scaled values to ``[-max_value, max_value]``.
    max_cells
        Compute the statistics on a seeded random subsample of about this many cells
        (random blocks of up to 1,024 rows), instead of all cells.
    random_state
        Seed of the subsample.
    mod
        Modality to read from MuData inputs.
    layer
        Read counts from ``layers[layer]`` instead of ``X``.
    progress
        Show a progress bar.
    n_workers
        Threads reading and summing blocks of rows in parallel (default: the CPUs this process may
        use, at most 8). The statistics are the same, bit for bit, whatever the number.

    Returns
    -------
    The fitted :class:`~sccoreset.pp.GeneSpace`.
    """
    check_positive(
        n_top_genes=n_top_genes, target_sum=target_sum, max_value=max_value, max_cells=max_cells, n_workers=n_workers
    )
    with open_sources(files, mod=mod, layer=layer) as sources:
        return fit_sources(
            sources, n_top_genes=n_top_genes, gene_list=gene_list, target_sum=target_sum, max_value=max_value,
            max_cells=max_cells, random_state=random_state, progress=progress, n_workers=n_workers,
        )  # fmt: skip


def fit_sources(
    sources: Sequence[Source],
    *,
    n_top_genes: int = 2000,
    gene_list: Sequence[str] | None = None,
    target_sum: float = 1e4,
    max_value: float = 10.0,
    max_cells: int | None = None,
    random_state: RandomState = 0,
    progress: bool = False,
    n_workers: int | None = None,
) -> GeneSpace:
    """:func:`fit_gene_space` on already opened sources (the caller closes them)."""
    warn_if_not_counts(sources)
    union = gene_union(sources)
    if gene_list is not None:
        wanted = pd.Index([str(g) for g in gene_list])
        if wanted.has_duplicates:
            raise InputError(f"gene_list: duplicate genes, e.g. {wanted[wanted.duplicated()][:5].tolist()}.")
        missing = wanted.difference(union)
        if len(missing) == len(wanted):
            raise InputError("gene_list: none of its genes is in any of the files.")
        if len(missing):
            logger.warning(f"gene_list: {len(missing)} genes are in no file and will be constant zeros.")
        genes = wanted
    else:
        genes = union
    sums, n_cells = accumulate_statistics(
        sources, genes, target_sum=target_sum, max_cells=max_cells, random_state=random_state, progress=progress,
        n_workers=n_workers,
    )  # fmt: skip
    if gene_list is None:
        disp = seurat_dispersions(sums[0], sums[1], n_cells)["dispersions_norm"].to_numpy()
        keep = top_genes(disp, n_top_genes)
        genes, sums, disp = genes[keep], sums[:, keep], disp[keep]
    else:
        disp = None
    n = float(n_cells)
    mean = sums[2] / n
    var = np.maximum(sums[3] / n - mean**2, 0.0) * (n / (n - 1) if n > 1 else 1.0)
    return GeneSpace(
        genes=np.asarray(genes, dtype=object),
        mean=mean,
        std=np.sqrt(var),
        target_sum=target_sum,
        max_value=max_value,
        n_cells=n_cells,
        dispersions_norm=disp,
    )
