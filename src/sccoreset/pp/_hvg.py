"""Highly variable genes from streamed per-gene sums (scanpy's ``flavor="seurat"``)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def seurat_dispersions(sum_x: np.ndarray, sum_x2: np.ndarray, n_cells: int, n_bins: int = 20) -> pd.DataFrame:
    """Per-gene means, dispersions and normalized dispersions as ``scanpy.pp.highly_variable_genes(flavor="seurat")``.

    ``sum_x`` and ``sum_x2`` are sums over cells of the normalized (not log) counts and of their squares:
    exactly what scanpy computes after ``expm1`` of the log1p data, so the ranking matches it on the
    concatenation of all files.
    """
    n = float(n_cells)
    mean = sum_x / n
    var = np.maximum(sum_x2 / n - mean**2, 0.0)
    if n > 1:
        var *= n / (n - 1)
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    log_mean = np.log1p(mean)
    df = pd.DataFrame({"means": log_mean, "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    return df


def top_genes(dispersions_norm: np.ndarray, n_top: int) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` genes with the highest normalized dispersion; NaN ranks last."""
    d = np.nan_to_num(np.asarray(dispersions_norm, dtype=np.float64), nan=-np.inf)
    n_top = min(n_top, d.size)
    order = np.argsort(-d, kind="stable")[:n_top]
    return np.sort(order)
