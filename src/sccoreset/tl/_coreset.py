"""Assemble the coreset AnnData from the final buffer: features, counts read back by provenance, obs, uns."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._engine._buffer import SCORE_NAMES, Buffer
from .._engine._events import History
from .._engine._model import model_record
from .._errors import InputError
from .._io._open_files import OpenFiles
from .._io._sources import Source
from .._utils import h5ad_safe_strings
from ..pp._gene_space import GeneSpace
from ..pp._scan import gene_union


def _kept_by_file(sources: Sequence[Source], buffer: Buffer) -> Iterator[tuple[int, np.ndarray]]:
    """``(file, buffer positions of its kept cells, by row)`` for every file holding kept cells, in file order.

    A file is open only while the caller reads it and then stays open for the next pass, up to
    :class:`~sccoreset._io._open_files.OpenFiles`' budget: kept cells from thousands of files do not run out of
    descriptors.
    """
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    open_files = OpenFiles(sources)
    for f in np.unique(files):
        sel = np.flatnonzero(files == f)
        open_files.begin([f])
        try:
            yield int(f), sel[np.argsort(rows[sel], kind="stable")]
        finally:
            open_files.end([f])


def _counts_on(sources: Sequence[Source], buffer: Buffer, n_cols: int, col_maps: Sequence[np.ndarray]) -> sp.csr_matrix:
    """Raw counts of the kept cells, read back from their files by provenance, on a target gene index.

    ``col_maps[f]`` gives, for each column of source ``f``, its column in the target (-1: not in the
    target). Each file's kept rows are read once, in file order (its ``layer`` when the stream read one),
    and the result is in buffer order, float32 CSR of shape ``(len(buffer), n_cols)``; target genes a
    file lacks are zeros for its cells.
    """
    n = len(buffer)
    rows = buffer.provenance["row"]
    parts, where = [], []
    projections: dict[int, sp.csr_matrix] = {}  # files sharing a gene list share its column map
    for f, order in _kept_by_file(sources, buffer):
        src = sources[f]
        block = src.read_rows_at(rows[order])
        m = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(order.size, len(src.var_names)))
        col_map = col_maps[f]
        proj = projections.get(id(col_map))
        if proj is None:
            keep = col_map >= 0
            # columns of the file that are in the target, moved to their place in it
            proj = projections[id(col_map)] = sp.csr_matrix(
                (np.ones(keep.sum(), np.float32), (np.flatnonzero(keep), col_map[keep])),
                shape=(len(src.var_names), n_cols),
            )
        parts.append((m @ proj).astype(np.float32, copy=False))
        where.append(order)
    if not parts:
        return sp.csr_matrix((0, n_cols), dtype=np.float32)
    stacked = sp.vstack(parts, format="csr")
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(n)
    out = stacked[inverse]
    out.sort_indices()
    return out


def _per_gene_list(sources: Sequence[Source], fn) -> list[Any]:
    """``fn(source)`` for every source, computed once per gene list (files with the same genes share one Index)."""
    done: dict[int, Any] = {}
    out = []
    for s in sources:
        key = id(s.var_names)
        if key not in done:
            done[key] = fn(s)
        out.append(done[key])
    return out


def _counts_on_genes(sources: Sequence[Source], buffer: Buffer, gene_space: GeneSpace) -> sp.csr_matrix:
    """Raw counts of the kept cells on the gene list, read back from their files by provenance."""
    col_maps = _per_gene_list(sources, lambda s: gene_space.column_map(s.var_names, source=s.name))
    return _counts_on(sources, buffer, gene_space.n_genes, col_maps)


class MissingGenesWarning(UserWarning):
    """A ``genes="all"`` coreset holds zeros for genes that some of the files do not have."""


def _counts_on_union(
    sources: Sequence[Source], buffer: Buffer
) -> tuple[sp.csr_matrix, pd.Index, np.ndarray, list[np.ndarray]]:
    """Raw counts of the kept cells on the union of the files' genes (order of first appearance).

    Returns the counts, the union, for each source the number of union genes it lacks (whose counts are
    zeros for its cells), and each source's column map into the union.
    """
    union = gene_union(sources)
    col_maps = _per_gene_list(sources, lambda s: union.get_indexer(s.var_names).astype(np.int64))
    missing = np.array([len(union) - int((c >= 0).sum()) for c in col_maps], dtype=np.int64)
    return _counts_on(sources, buffer, len(union), col_maps), union, missing, col_maps


def _all_genes_var(
    union: pd.Index, col_maps: Sequence[np.ndarray], gene_space: GeneSpace, key_added: str
) -> pd.DataFrame:
    """The var of a ``genes="all"`` coreset: the gene list marked, its statistics (NaN elsewhere), files per gene.

    ``col_maps``: each source's columns in ``union`` (from :func:`_counts_on_union`).
    """
    pos = pd.Index(gene_space.genes).get_indexer(union)
    on_list = pos >= 0
    mean = np.full(len(union), np.nan)
    std = np.full(len(union), np.nan)
    mean[on_list] = gene_space.mean[pos[on_list]]
    std[on_list] = gene_space.std[pos[on_list]]
    n_files = np.zeros(len(union), dtype=np.int64)
    for col_map in col_maps:
        n_files[col_map] += 1
    return pd.DataFrame(
        {"highly_variable": on_list, "mean": mean, "std": std, f"{key_added}_n_files": n_files},
        index=pd.Index(np.asarray(union, dtype=object).astype(str)),
    )


def _obs(sources: Sequence[Source], buffer: Buffer, tasks: dict[str, Sequence[str]], prefix: str) -> pd.DataFrame:
    """The kept cells' own obs rows, in buffer order, plus provenance and score columns named ``{prefix}_*``."""
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    frames, where = [], []
    for f, order in _kept_by_file(sources, buffer):
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
    for t, (key, classes) in enumerate(tasks.items()):
        obs[key] = pd.Categorical(np.asarray(classes, dtype=object)[buffer.targets[:, t]], categories=list(classes))
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
    genes: str = "list",
    tasks: dict[str, Sequence[str]] | None = None,
    budget: Any = None,
) -> AnnData:
    """The coreset AnnData: features, raw counts, obs with provenance, the run's record in uns.

    ``genes="list"``: ``X`` the features on the gene list, ``layers["counts"]`` the raw counts on the same
    genes, ``var`` the list with its ``mean`` and ``std``. ``genes="all"``: ``X`` the raw counts on the union
    of the files' genes (float32 CSR, genes a file lacks are zeros for its cells, counted per file in
    ``uns[key_added]["genes_missing_per_file"]`` and warned about), ``var["highly_variable"]`` marking the
    gene list, ``mean``/``std`` NaN off the list, ``var[f"{key_added}_n_files"]`` the files that have each
    gene, and the features in ``obsm[f"{key_added}_features"]`` (columns: the gene list, in its order).

    With ``class_totals`` (cells of each class the stream delivered), ``obs[f"{key_added}_weight"]`` holds the
    number of stream cells each kept cell stands for: its class's total over the kept cells of that class
    (class: of the ``budget``, the label key or combination of keys selection balanced).

    ``tasks`` (label key -> classes, in order) gives one obs column per task (default ``{label_key: classes}``).
    """
    tasks = {label_key: list(classes)} if tasks is None else tasks
    obs = _obs(sources, buffer, tasks, key_added)
    if class_totals is not None:
        obs[f"{key_added}_weight"] = representation_weights(buffer.y, class_totals)
    missing = None
    if genes == "list":
        counts = _counts_on_genes(sources, buffer, gene_space)
        var = pd.DataFrame(
            {"mean": gene_space.mean, "std": gene_space.std}, index=pd.Index(gene_space.genes.astype(str))
        )
        adata = AnnData(
            X=np.ascontiguousarray(buffer.host_X()),
            obs=h5ad_safe_strings(obs),
            var=h5ad_safe_strings(var),
            layers={"counts": counts},
        )
    elif genes == "all":
        counts, union, missing, col_maps = _counts_on_union(sources, buffer)
        adata = AnnData(
            X=counts,
            obs=h5ad_safe_strings(obs),
            var=h5ad_safe_strings(_all_genes_var(union, col_maps, gene_space, key_added)),
            obsm={f"{key_added}_features": np.ascontiguousarray(buffer.host_X(), dtype=np.float32)},
        )
        if missing.any():
            lacking = [f"{s.name} ({k})" for s, k in zip(sources, missing, strict=True) if k]
            warnings.warn(
                f"genes='all': {len(lacking)} of {len(sources)} files lack some of the {len(union)} genes of the "
                f"union; their cells hold zeros for those genes: {', '.join(lacking[:5])}"
                f"{' ...' if len(lacking) > 5 else ''}. Counts per file: uns[{key_added!r}]['genes_missing_per_file'];"
                f" files per gene: var[{key_added + '_n_files'!r}].",
                MissingGenesWarning,
                stacklevel=2,
            )
    else:
        raise InputError(f"genes must be 'list' or 'all', got {genes!r}.")
    adata.uns[key_added] = {
        "params": params,
        "label_key": label_key,
        "classes": np.asarray(classes, dtype=str),
        "label_keys": np.asarray(list(tasks), dtype=str),
        "tasks": {key: np.asarray(c, dtype=str) for key, c in tasks.items()},
        "files": np.asarray([s.name for s in sources], dtype=str),
        "gene_space": gene_space.to_dict(),
        "history": history.to_uns(),
        "model": model_record(model.cpu(), spec),
    }
    if budget is not None and len(budget.keys) > 1:
        adata.uns[key_added]["budget"] = {"keys": np.asarray(budget.keys, dtype=str)}
        obs_budget = np.asarray(budget.names, dtype=object)[buffer.y]
        adata.obs[f"{key_added}_budget_class"] = pd.Categorical(obs_budget.astype(str))
    if missing is not None:
        adata.uns[key_added]["genes_missing_per_file"] = missing
    return adata
