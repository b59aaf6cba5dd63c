"""The bundled real dataset: scanpy's 700 PBMCs as raw counts, and a class-incremental stream of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp


def pbmc_counts() -> ad.AnnData:
    """Scanpy's ``pbmc68k_reduced`` (700 cells, 765 genes, 10 ``bulk_labels``) with integer counts in ``X``.

    The dataset ships only log-normalized values (``.raw``). Each cell's normalized values are
    multiples of its smallest nonzero value (one count), so dividing ``expm1(raw)`` by that value and
    rounding recovers the counts on these 765 genes (the largest rounding offset is about 0.1).
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    x = ref.raw.X.toarray().astype(np.float64) if sp.issparse(ref.raw.X) else np.asarray(ref.raw.X, np.float64)
    norm = np.expm1(x)
    unit = np.where(norm > 0, norm, np.inf).min(1, keepdims=True)
    counts = np.rint(norm / unit).astype(np.float32)
    obs = ref.obs[["bulk_labels", "louvain", "phase", "n_genes", "percent_mito"]].copy()
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=ref.raw.var[[]].copy())
    adata.uns["bulk_labels_colors"] = np.asarray(ref.uns["bulk_labels_colors"])
    return adata


@dataclass
class PBMCStream:
    """Paths of the chunked PBMC stream.

    Attributes
    ----------
    files
        Training files, ordered by cell type (class-incremental).
    holdout
        Held-out cells (a stratified share of every type).
    label_key
        obs column with the cell types.
    """

    files: list[Path]
    holdout: Path
    label_key: str = "bulk_labels"


def pbmc_stream(
    directory: str | Path, *, n_files: int = 5, holdout_fraction: float = 0.2, random_state: int = 0
) -> PBMCStream:
    """Write :func:`pbmc_counts` as ``n_files`` files sorted by cell type, plus a stratified held-out file.

    Sorting by type makes the stream class-incremental: early files hold only the first types,
    late files only the last ones, the hard case for streaming training.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adata = pbmc_counts()
    rng = np.random.default_rng(random_state)
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    held = np.zeros(adata.n_obs, dtype=bool)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        n_held = max(1, round(holdout_fraction * idx.size))
        held[rng.choice(idx, n_held, replace=False)] = True
    train = adata[~held]
    order = np.argsort(train.obs["bulk_labels"].cat.codes.to_numpy(), kind="stable")
    train = train[order]
    files = []
    for i, rows in enumerate(np.array_split(np.arange(train.n_obs), n_files)):
        path = directory / f"pbmc_part{i}.h5ad"
        train[rows].copy().write_h5ad(path)
        files.append(path)
    holdout = directory / "pbmc_holdout.h5ad"
    adata[held].copy().write_h5ad(holdout)
    return PBMCStream(files=files, holdout=holdout)
