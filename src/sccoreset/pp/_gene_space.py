"""The fitted gene space: one global gene list and one set of scaling statistics for the whole stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import InputError
from .._io._kernels import bad_row_message, csr_transform, csr_transform_serial


@dataclass
class GeneSpace:
    """Global gene list and per-gene statistics of normalized, log1p-transformed expression.

    Every chunk of the stream, and later any data to predict on, is turned into features by
    :meth:`transform` with these same statistics, so a cell gets the same features wherever it sits.

    Attributes
    ----------
    genes
        The gene list (feature order of the model).
    mean, std
        Per-gene mean and standard deviation (unbiased) of ``log1p(normalize_total(x))``,
        computed over all cells of the stream (or a seeded subsample, see ``n_cells``).
    target_sum
        Counts per cell after ``normalize_total``.
    max_value
        Scaled values are clipped to ``[-max_value, max_value]``.
    n_cells
        Number of cells the statistics were computed on.
    dispersions_norm
        Normalized dispersion of each gene in ``genes`` (seurat flavor), NaN when the list was given.
    """

    genes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    target_sum: float = 1e4
    max_value: float = 10.0
    n_cells: int = 0
    dispersions_norm: np.ndarray | None = None
    _index: pd.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.genes = np.asarray(self.genes, dtype=object).astype(str).astype(object)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        if not (len(self.genes) == len(self.mean) == len(self.std)):
            raise InputError("GeneSpace: genes, mean and std must have the same length.")
        if self.dispersions_norm is None:
            self.dispersions_norm = np.full(len(self.genes), np.nan)
        self._index = pd.Index(self.genes)
        if self._index.has_duplicates:
            raise InputError("GeneSpace: duplicate genes in the gene list.")
        safe = np.where(self.std > 0, self.std, 1.0)
        # float32 copies for the kernel, which computes in float32 like scanpy on float32 counts
        self._mean32 = self.mean.astype(np.float32)
        self._inv_std32 = (1.0 / safe).astype(np.float32)
        self._fill32 = np.clip(-self._mean32 * self._inv_std32, -self.max_value, self.max_value).astype(np.float32)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def __repr__(self) -> str:
        return f"GeneSpace({self.n_genes} genes, fitted on {self.n_cells} cells, target_sum={self.target_sum:g})"

    # -- alignment --------------------------------------------------------------------------
    def column_map(self, var_names: Sequence[str] | pd.Index, *, source: str = "data") -> np.ndarray:
        """For each input column, its position in :attr:`genes` or -1 when the gene is not in the list."""
        var_names = var_names if isinstance(var_names, pd.Index) else pd.Index(var_names)
        if var_names.has_duplicates:
            dups = var_names[var_names.duplicated()].unique()[:5].tolist()
            raise InputError(f"{source}: duplicate gene names in var_names, e.g. {dups}.")
        col_map = self._index.get_indexer(var_names).astype(np.int32)
        if not (col_map >= 0).any():
            raise InputError(
                f"{source}: none of its {len(var_names)} genes is in the gene list "
                f"({self.n_genes} genes, e.g. {list(self.genes[:3])}); are the gene identifiers of the same kind?"
            )
        return col_map

    # -- transform --------------------------------------------------------------------------
    def transform_csr(
        self,
        data: np.ndarray,
        indices: np.ndarray,
        indptr: np.ndarray,
        col_map: np.ndarray,
        *,
        source: str = "data",
        row_offset: int = 0,
        out: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        what: str = "X",
        parallel: bool = True,
    ) -> np.ndarray:
        """Transform CSR arrays of raw counts (columns given by ``col_map``) into float32 features.

        ``out`` (float32, C-contiguous, ``(n_rows, n_genes)``) receives the result when given.
        Errors name row ``row_offset + i`` of ``source``, or ``rows[i]`` when ``rows`` is given,
        and the matrix ``what`` (``X`` or ``layers/<name>``). ``parallel=False`` runs the kernel in the
        calling thread only (for reader threads that each transform their own chunk).
        """
        n = indptr.size - 1
        if out is None:
            out = np.empty((n, self.n_genes), dtype=np.float32)
        elif (
            not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n, self.n_genes)
            or not out.flags.c_contiguous or not out.flags.writeable
        ):  # fmt: skip
            shape = getattr(out, "shape", None)
            raise ValueError(
                f"out must be a writeable, C-contiguous float32 array of shape {(n, self.n_genes)} "
                f"(rows of indptr, genes of the gene space), got {type(out).__name__} {getattr(out, 'dtype', '')} "
                f"of shape {shape}."
            )
        if col_map.ndim != 1 or col_map.dtype.kind not in "iu":
            raise ValueError(f"col_map must be a 1-D integer array, got {col_map.dtype} of shape {col_map.shape}.")
        if col_map.size and (int(col_map.max()) >= self.n_genes or int(col_map.min()) < -1):
            raise ValueError(f"col_map values must lie in [-1, {self.n_genes}) (-1: not on the gene list).")
        return self._transform_into(data, indices, indptr, col_map, out, source, row_offset, rows, what, parallel)

    def _transform_into(self, data, indices, indptr, col_map, out, source, row_offset, rows, what, parallel):
        """:meth:`transform_csr` without its argument checks, for callers whose ``out`` and ``col_map`` are right."""
        n = indptr.size - 1
        bad = np.zeros(n, dtype=np.uint8)
        (csr_transform if parallel else csr_transform_serial)(
            data,
            indices,
            indptr,
            col_map,
            self._mean32,
            self._inv_std32,
            self._fill32,
            np.float32(self.target_sum),
            np.float32(self.max_value),
            out,
            bad,
        )
        if bad.any():
            raise InputError(bad_row_message(bad, rows, row_offset, source, what))
        return out

    def transform(self, X: Any, var_names: Sequence[str] | pd.Index, *, source: str = "data") -> np.ndarray:
        """Transform a counts matrix (sparse or dense, any gene order) into float32 features on :attr:`genes`.

        Parameters
        ----------
        X
            Raw counts, cells × genes, scipy sparse or dense.
        var_names
            Gene names of the columns of ``X``; genes of the list missing from them are zeros.
        source
            Name used in error messages.

        Returns
        -------
        Dense float32 array of shape ``(n_cells, n_genes)``.
        """
        col_map = self.column_map(var_names, source=source)
        m = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
        if m.shape[1] != len(col_map):
            raise InputError(f"{source}: X has {m.shape[1]} columns but {len(col_map)} gene names were given.")
        return self.transform_csr(m.data, m.indices, m.indptr.astype(np.int64), col_map, source=source)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of arrays and numbers, storable in ``adata.uns`` and .h5ad files."""
        return {
            "genes": np.asarray(self.genes, dtype=str),
            "mean": self.mean.copy(),
            "std": self.std.copy(),
            "target_sum": float(self.target_sum),
            "max_value": float(self.max_value),
            "n_cells": int(self.n_cells),
            "dispersions_norm": np.asarray(self.dispersions_norm, dtype=np.float64),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneSpace:
        """Inverse of :meth:`to_dict` (also accepts what an .h5ad file gives back)."""
        try:
            return cls(
                genes=np.asarray(d["genes"]).astype(str),
                mean=np.asarray(d["mean"]),
                std=np.asarray(d["std"]),
                target_sum=float(d["target_sum"]),
                max_value=float(d["max_value"]),
                n_cells=int(d["n_cells"]),
                dispersions_norm=np.asarray(d["dispersions_norm"]) if "dispersions_norm" in d else None,
            )
        except KeyError as e:
            raise InputError(f"GeneSpace.from_dict: missing key {e}.") from e
