"""Assemble the coreset AnnData from the final buffer: features, counts read back by provenance, obs, uns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._engine._buffer import SCORE_NAMES, Buffer
from .._engine._events import History
from .._engine._model import model_record
from .._io._sources import Source
from .._utils import h5ad_safe_strings
from ..pp._gene_space import GeneSpace


def _counts_on_genes(sources: Sequence[Source], buffer: Buffer, gene_space: GeneSpace) -> sp.csr_matrix:
    """Raw counts of the kept cells on the gene list, read back from their files by provenance."""
    n = len(buffer)
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    parts, where = [], []
    for f in np.unique(files):
        sel = np.flatnonzero(files == f)
        order = sel[np.argsort(rows[sel])]
        src = sources[f]
        block = src.read_rows_at(rows[order])
        m = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(order.size, len(src.var_names)))
        col_map = gene_space.column_map(src.var_names, source=src.name)
        keep = col_map >= 0
        # columns of the file that are on the gene list, moved to their place in it
        proj = sp.csr_matrix(
            (np.ones(keep.sum(), np.float32), (np.flatnonzero(keep), col_map[keep])),
            shape=(len(src.var_names), gene_space.n_genes),
        )
        parts.append((m @ proj).astype(np.float32, copy=False))
        where.append(order)
    stacked = sp.vstack(parts, format="csr")
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(n)
    return stacked[inverse]


def _obs(
    sources: Sequence[Source], buffer: Buffer, classes: Sequence[str], label_key: str, prefix: str
) -> pd.DataFrame:
    """The kept cells' own obs rows, in buffer order, plus provenance and score columns named ``{prefix}_*``."""
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    frames, where = [], []
    for f in np.unique(files):
        sel = np.flatnonzero(files == f)
        order = sel[np.argsort(rows[sel], kind="stable")]
        frames.append(sources[f].read_obs(rows[order]))
        where.append(order)
    cell_names = np.concatenate([np.asarray(fr.index, dtype=object).astype(str) for fr in frames])
    obs = pd.concat([fr.reset_index(drop=True) for fr in frames], ignore_index=True)
    inverse = np.empty(len(buffer), dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(len(buffer))
    obs = obs.iloc[inverse].reset_index(drop=True)
    cell_names = cell_names[inverse]
    for col in obs.columns:  # columns missing from some files: keep h5ad-writable dtypes
        if obs[col].dtype == object:
            obs[col] = pd.Categorical(obs[col].astype(str))
    obs[label_key] = pd.Categorical([classes[i] for i in buffer.y], categories=list(classes))
    names = [sources[f].name for f in range(len(sources))]
    obs[f"{prefix}_file"] = pd.Categorical([names[f] for f in files], categories=names)
    obs[f"{prefix}_row"] = rows.astype(np.int64)
    obs[f"{prefix}_chunk"] = buffer.provenance["chunk"].astype(np.int64)
    obs[f"{prefix}_step_added"] = buffer.provenance["step_added"].astype(np.int64)
    for key in SCORE_NAMES:
        obs[f"{prefix}_{key}"] = np.asarray(buffer.scores[key], dtype=np.float64)
    obs.index = pd.Index(cell_names, dtype=object)
    if obs.index.has_duplicates:  # the same obs name in two files: make them unique, keep the original
        obs[f"{prefix}_obs_name"] = obs.index.to_numpy()
        obs.index = [f"{n}-{f}" for n, f in zip(obs.index, files, strict=True)]
    return obs


def representation_weights(y: np.ndarray, class_totals: np.ndarray) -> np.ndarray:
    """Stream cells each kept cell stands for: its class's stream count divided by the kept cells of the class.

    Weighted class counts of the coreset then equal the stream's exactly (for every class that has a kept
    cell), and a weighted mean over the coreset estimates the stream's mean.
    """
    kept = np.bincount(y, minlength=len(class_totals)).astype(np.float64)
    per_class = np.divide(class_totals, kept, out=np.zeros(len(class_totals)), where=kept > 0)
    return per_class[y]


def build_coreset(
    sources: Sequence[Source],
    buffer: Buffer,
    history: History,
    *,
    gene_space: GeneSpace,
    classes: Sequence[str],
    label_key: str,
    model: Any,
    spec: dict | None,
    params: dict[str, Any],
    key_added: str = "sccoreset",
    class_totals: np.ndarray | None = None,
) -> AnnData:
    """The coreset AnnData: features, raw counts on the gene list, obs with provenance, the run's record in uns.

    With ``class_totals`` (cells of each class the stream delivered), ``obs[f"{key_added}_weight"]`` holds the
    number of stream cells each kept cell stands for: its class's total over the kept cells of that class.
    """
    obs = _obs(sources, buffer, classes, label_key, key_added)
    if class_totals is not None:
        obs[f"{key_added}_weight"] = representation_weights(buffer.y, class_totals)
    counts = _counts_on_genes(sources, buffer, gene_space)
    var = pd.DataFrame({"mean": gene_space.mean, "std": gene_space.std}, index=pd.Index(gene_space.genes.astype(str)))
    adata = AnnData(
        X=np.ascontiguousarray(buffer.host_X()),
        obs=h5ad_safe_strings(obs),
        var=h5ad_safe_strings(var),
        layers={"counts": counts},
    )
    adata.uns[key_added] = {
        "params": params,
        "label_key": label_key,
        "classes": np.asarray(classes, dtype=str),
        "files": np.asarray([s.name for s in sources], dtype=str),
        "gene_space": gene_space.to_dict(),
        "history": history.to_uns(),
        "model": model_record(model.cpu(), spec),
    }
    return adata
