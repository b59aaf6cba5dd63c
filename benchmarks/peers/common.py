"""Shared by the peer loaders: the model-ready transform in plain numpy/scipy, the timing loop, the result.

Runs in the peers' own environment (not sccoreset's): it imports numpy, scipy and pandas only. The gene
space comes from an .npz written by bench_io.py (genes, mean, std, target_sum, max_value); the features are
those of ``sccoreset.pp.GeneSpace.transform``: normalize_total -> log1p -> the gene list (genes of the list a
file lacks are zeros) -> (x - mean) / std (std 0 -> 1) -> clip to +-max_value -> float32 dense.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp


class Features:
    """The gene space's arrays and the transform of a CSR block of raw counts onto it."""

    def __init__(self, path: str) -> None:
        z = np.load(path, allow_pickle=False)
        self.genes = pd.Index(z["genes"].astype(str))
        self.target_sum = np.float32(z["target_sum"])
        self.max_value = np.float32(z["max_value"])
        std = z["std"].astype(np.float64)
        self.mean = z["mean"].astype(np.float32)
        self.inv_std = (1.0 / np.where(std > 0, std, 1.0)).astype(np.float32)
        # the value of a zero count (and of a gene of the list the file lacks)
        self.fill = np.clip(-self.mean * self.inv_std, -self.max_value, self.max_value).astype(np.float32)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def col_map(self, var_names: Iterable[str]) -> np.ndarray:
        """Position in the gene list of each column of a file, -1 for genes not on the list."""
        return self.genes.get_indexer(pd.Index(var_names)).astype(np.int64)

    def transform(self, X: sp.csr_matrix | sp.csr_array, col_map: np.ndarray, out: np.ndarray | None = None):
        """Raw counts (CSR, the file's columns) -> float32 features ``(n_cells, n_genes)``, vectorised."""
        n = X.shape[0]
        if out is None:
            out = np.empty((n, self.n_genes), dtype=np.float32)
        out[:] = self.fill
        indptr = np.asarray(X.indptr, dtype=np.int64)
        data = np.asarray(X.data, dtype=np.float32)
        totals = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
        scale = np.divide(self.target_sum, totals, out=np.zeros(n, np.float32), where=totals > 0)
        cols = col_map[X.indices]
        keep = cols >= 0  # about 1 in 10 stored genes is on the list
        kept = np.flatnonzero(keep)
        cum = np.concatenate(([0], np.cumsum(keep)))
        rows = np.repeat(np.arange(n), cum[indptr[1:]] - cum[indptr[:-1]])
        cols = cols[kept]
        vals = np.log1p(data[kept] * scale[rows])
        vals -= self.mean[cols]
        vals *= self.inv_std[cols]
        np.clip(vals, -self.max_value, self.max_value, out=vals)
        out[rows, cols] = vals
        return out


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gene-space", required=True, help=".npz with genes, mean, std, target_sum, max_value")
    p.add_argument("--order", choices=["sequential", "shuffled"], default="sequential")
    p.add_argument("--settings", default="{}", help="JSON dict of loader settings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--first-batch", help="write the first batch (X, labels, obs_names) to this .npz")
    p.add_argument("files", nargs="+")
    return p


def run(epoch: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]]], args, **info) -> None:
    """Time ``repeats`` full passes of ``epoch()`` (batches of features, labels, obs names) and print JSON.

    The loader is built before ``epoch`` is called: opening the files is not timed, iterating is.
    """
    rates, cells = [], 0
    for rep in range(args.repeats):
        cells = 0
        t0 = time.perf_counter()
        for i, (X, labels, names) in enumerate(epoch()):
            if X.dtype != np.float32 or X.ndim != 2 or len(labels) != X.shape[0]:
                raise TypeError(f"not model-ready: X {X.dtype} {X.shape}, {len(labels)} labels")
            if rep == 0 and i == 0 and args.first_batch:
                k = min(X.shape[0], 512)
                np.savez(
                    args.first_batch, X=np.asarray(X[:k]), labels=np.asarray(labels[:k]).astype(str),
                    obs_names=np.asarray(names[:k]).astype(str),
                )  # fmt: skip
            cells += X.shape[0]
        rates.append(cells / (time.perf_counter() - t0))
    print(json.dumps({"cells_per_s": max(rates), "all_cells_per_s": rates, "cells": cells, **info}))
