"""In-memory transform of an AnnData onto a fitted gene space."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData

from .._errors import InputError
from .._utils import h5ad_safe_strings
from ._gene_space import GeneSpace


def transform(adata: AnnData, gene_space: GeneSpace, *, layer: str | None = None) -> AnnData:
    """Features of ``adata`` on the gene list, exactly as the stream's chunks are transformed.

    Parameters
    ----------
    adata
        Cells with raw counts in ``X`` (or in ``layers[layer]``), genes in any order; genes of the
        list that ``adata`` lacks become zeros before scaling.
    gene_space
        The fitted :class:`~sccoreset.pp.GeneSpace`.
    layer
        Read counts from this layer instead of ``X``.

    Returns
    -------
    A new AnnData with float32 features in ``X``, ``adata.obs`` copied and ``var`` indexed by the gene list.
    """
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not in adata.layers (layers: {list(adata.layers)}).")
    counts = adata.X if layer is None else adata.layers[layer]
    X = gene_space.transform(counts, adata.var_names, source="adata")
    var = pd.DataFrame(
        {"mean": gene_space.mean, "std": gene_space.std}, index=pd.Index(gene_space.genes.astype(str), name=None)
    )
    return AnnData(X=X, obs=adata.obs.copy(), var=h5ad_safe_strings(var))
