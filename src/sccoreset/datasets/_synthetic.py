"""A seeded generator of realistic single-cell count streams (many files, class-incremental, batch effects)."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import h5ad_safe_strings

_LINEAGES = ["T", "B", "Myeloid", "NK", "Stromal", "Epithelial", "Endothelial", "Erythroid"]


@dataclass
class SyntheticStream:
    """Paths and ground truth of a generated stream.

    Attributes
    ----------
    files
        The training files, in stream order.
    holdout
        A held-out file with the same number of cells of every type.
    types
        All cell type names.
    lineage
        Lineage of each type.
    late_type, rare_type
        The type appearing only in the second half of the stream, and the rare type (None if absent).
    label_key
        obs column holding the type (in ``"tahoe"`` mode the main task, ``"cell_line"`` by default).
    params
        The generator's parameters (the cache key of the files).
    label_keys
        obs columns of every task, ``label_key`` first: ``[label_key]`` in ``"types"`` mode,
        ``cell_line``, ``drug``, ``moa_broad`` and ``moa_fine`` in ``"tahoe"`` mode.
    mode
        ``"types"`` or ``"tahoe"`` (see :func:`synthetic_stream`).
    classes
        All classes of every task in ``label_keys``.
    drug_moa
        ``"tahoe"`` mode: every drug's ``moa_fine`` and ``moa_broad``.
    plate_drugs
        ``"tahoe"`` mode: the drugs on every plate (file), DMSO included.
    sensitivity
        ``"tahoe"`` mode: every cell line's mean drug sensitivity (weak responders are well below 1).

    In ``"tahoe"`` mode ``types`` holds the cell lines and ``lineage`` their tissue.
    """

    files: list[Path]
    holdout: Path
    types: list[str]
    lineage: dict[str, str]
    late_type: str | None
    rare_type: str | None
    label_key: str = "cell_type"
    params: dict = field(default_factory=dict)
    label_keys: list[str] = field(default_factory=list)
    mode: str = "types"
    classes: dict[str, list[str]] = field(default_factory=dict)
    drug_moa: dict[str, dict[str, str]] = field(default_factory=dict)
    plate_drugs: dict[str, list[str]] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label_keys:
            self.label_keys = [self.label_key]
        if not self.classes:
            self.classes = {self.label_key: list(self.types)}


def write_file(path, X, obs, genes, rng, missing_gene_fraction: float, drop_genes: bool) -> None:
    """Write one generated file; with ``drop_genes`` its genes are shuffled and ``missing_gene_fraction`` of them left out."""
    var_idx = np.arange(len(genes))
    if drop_genes:
        keep = rng.random(len(genes)) >= missing_gene_fraction
        var_idx = rng.permutation(np.flatnonzero(keep))
    var = pd.DataFrame(index=genes[var_idx])
    adata = ad.AnnData(X=X[:, var_idx], obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(var))
    adata.write_h5ad(path)


def _programs(rng, n_genes, base, n_lineages, subtypes_per_lineage, lineage_strength, subtype_strength):
    """Log fold changes (n_types, n_genes): shared lineage programs plus subtle subtype programs."""
    # markers come from moderately to highly expressed genes, as real marker genes do
    candidates = np.flatnonzero(base > np.quantile(base, 0.6))
    n_types = n_lineages * subtypes_per_lineage
    lfc = np.zeros((n_types, n_genes), dtype=np.float64)
    n_lin_genes = max(20, n_genes // 100)
    n_sub_genes = max(10, n_genes // 250)
    for li in range(n_lineages):
        genes = rng.choice(candidates, n_lin_genes, replace=False)
        effect = rng.normal(lineage_strength, 0.3 * lineage_strength, n_lin_genes) * rng.choice(
            [-1, 1], n_lin_genes, p=[0.2, 0.8]
        )
        for s in range(subtypes_per_lineage):
            t = li * subtypes_per_lineage + s
            lfc[t, genes] += effect
            sub = rng.choice(candidates, n_sub_genes, replace=False)
            lfc[t, sub] += rng.normal(subtype_strength, 0.25 * subtype_strength, n_sub_genes)
    return lfc


@numba.njit(parallel=True, cache=True)
def _nb_counts(profile, types, library, r, u, out):
    """Negative binomial draws (mean ``library[i] * profile[types[i], j]``, size ``r``) by inverse CDF of ``u``."""
    for i in numba.prange(u.shape[0]):
        t = types[i]
        for j in range(u.shape[1]):
            m = library[i] * profile[t, j]
            p0 = math.exp(-r * math.log1p(m / r))
            uij = u[i, j]
            if uij < p0:
                out[i, j] = 0.0
                continue
            q = m / (r + m)
            k = 0
            pk = p0
            cdf = p0
            while uij >= cdf and k < 100_000:
                pk *= (k + r) / (k + 1) * q
                k += 1
                cdf += pk
            out[i, j] = k


@numba.njit(cache=True)
def _dense_to_csr(x):
    n, g = x.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        c = 0
        for j in range(g):
            if x[i, j] != 0:
                c += 1
        indptr[i + 1] = indptr[i] + c
    data = np.empty(indptr[n], dtype=np.float32)
    indices = np.empty(indptr[n], dtype=np.int32)
    for i in range(n):
        k = indptr[i]
        for j in range(g):
            if x[i, j] != 0:
                data[k] = x[i, j]
                indices[k] = j
                k += 1
    return data, indices, indptr


def _sample_counts(rng, log_p, types, library, batch_lfc, dispersion):
    """Negative binomial (gamma-Poisson) counts, CSR float32, for cells of the given types."""
    logits = log_p + batch_lfc[None, :]
    profile = np.exp(logits - logits.max(1, keepdims=True))
    profile /= profile.sum(1, keepdims=True)
    rows = []
    for lo in range(0, types.size, 2000):
        t = types[lo : lo + 2000].astype(np.int64)
        u = rng.random((t.size, log_p.shape[1]), dtype=np.float32)
        out = np.empty(u.shape, dtype=np.float32)
        _nb_counts(profile, t, library[lo : lo + 2000].astype(np.float64), float(dispersion), u, out)
        rows.append(sp.csr_matrix(_dense_to_csr(out), shape=out.shape))
    return sp.vstack(rows, format="csr")


def _schedule(rng, n_files, regular, types_per_file, late, rare, rare_fraction, cells_per_file):
    """Type proportions of every file: a window of regular types moving by two per file."""
    props = np.zeros((n_files, len(regular) + 2))
    for f in range(n_files):
        idx = [(2 * f + j) % len(regular) for j in range(types_per_file)]
        props[f, idx] = rng.dirichlet(np.full(types_per_file, 3.0))
        if late is not None and f >= n_files // 2:
            props[f] *= 1 - 1.0 / (types_per_file + 1)
            props[f, len(regular)] = 1.0 / (types_per_file + 1)
    if rare is not None:
        rare_files = rng.choice(n_files, size=min(2, n_files), replace=False)
        share = rare_fraction * n_files / len(rare_files)
        for f in rare_files:
            props[f] *= 1 - share
            props[f, len(regular) + 1] = share
    counts = np.floor(props * cells_per_file).astype(int)
    counts[np.arange(n_files), props.argmax(1)] += cells_per_file - counts.sum(1)
    return counts


def synthetic_stream(
    directory: str | Path,
    *,
    n_files: int = 10,
    cells_per_file: int = 10_000,
    n_genes: int = 20_000,
    n_lineages: int = 4,
    subtypes_per_lineage: int = 3,
    types_per_file: int = 4,
    late_type: bool = True,
    rare_type: bool = True,
    rare_fraction: float = 0.005,
    lineage_strength: float = 1.5,
    subtype_strength: float = 0.8,
    batch_strength: float = 0.25,
    library_size: float = 4000.0,
    dispersion: float = 2.0,
    missing_gene_fraction: float = 0.02,
    holdout_per_type: int = 300,
    label_key: str = "cell_type",
    random_state: int = 0,
    overwrite: bool = False,
    mode: Literal["types", "tahoe"] = "types",
    **tahoe_options: Any,
) -> SyntheticStream:
    """Write a seeded, class-incremental stream of raw-count ``.h5ad`` files and a balanced held-out file.

    ``mode="tahoe"`` writes a Tahoe-100M-like drug perturbation stream instead (cell lines × drugs ×
    mechanism of action, plates as files; tasks ``cell_line``, ``drug``, ``moa_broad``,
    ``moa_fine``): see :func:`tahoe_stream`, which receives ``n_files``, ``cells_per_file``,
    ``n_genes``, ``batch_strength``, ``library_size``, ``dispersion``, ``missing_gene_fraction``,
    ``random_state``, ``overwrite``, ``label_key`` (when not ``"cell_type"``) and ``tahoe_options``
    (its other keywords, e.g. ``n_cell_lines``, ``n_drugs``, ``holdout_per_condition``); the
    options of cell types (``n_lineages``, ``holdout_per_type``, ...) must then keep their defaults.
    The shared options keep this function's defaults (10 plates, not :func:`tahoe_stream`'s 14).

    The default ``mode="types"`` follows.

    Cell types form ``n_lineages`` lineages of ``subtypes_per_lineage`` subtypes: types of a lineage
    share a strong program and differ by a subtle one. Counts are negative binomial around a
    log-normal gene expression profile with log-normal library sizes, so cells express roughly
    1,500–2,500 of 20,000 genes. Every file has its own batch effect (gene-wise log fold changes
    and a library-size shift) and holds about ``types_per_file`` types; one type appears only in the
    second half of the stream and one is rare (``rare_fraction`` of all cells). Every other file
    lacks ``missing_gene_fraction`` of the genes and stores its genes in a shuffled order.

    Files are reused when ``directory`` already holds a stream made with the same parameters.

    Returns
    -------
    A :class:`SyntheticStream` with the paths and the ground truth.
    """
    # the mode is not part of the "types" cache key, so that streams written before modes existed are reused
    params = {k: v for k, v in locals().items() if k not in ("directory", "overwrite", "mode", "tahoe_options")}
    if mode == "tahoe":
        return _tahoe_mode(directory, params, overwrite, tahoe_options)
    if mode != "types":
        raise ValueError(f"mode must be 'types' or 'tahoe', got {mode!r}")
    if tahoe_options:
        raise TypeError(f"synthetic_stream got unexpected keyword arguments {sorted(tahoe_options)}")
    directory = Path(directory)
    manifest = directory / "manifest.json"
    if manifest.exists() and not overwrite:
        saved = json.loads(manifest.read_text())
        if saved["params"] == params:
            return SyntheticStream(
                files=[Path(p) for p in saved["files"]],
                holdout=Path(saved["holdout"]),
                types=saved["types"],
                lineage=saved["lineage"],
                late_type=saved["late_type"],
                rare_type=saved["rare_type"],
                label_key=label_key,
                params=params,
            )
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(random_state)
    genes = np.array([f"GENE{i:05d}" for i in range(n_genes)])
    base = rng.normal(0.0, 1.6, n_genes)
    lfc = _programs(rng, n_genes, base, n_lineages, subtypes_per_lineage, lineage_strength, subtype_strength)
    log_p = base[None, :] + lfc
    names = [
        f"{_LINEAGES[li % len(_LINEAGES)]}-{s + 1}" for li in range(n_lineages) for s in range(subtypes_per_lineage)
    ]
    lineage = {n: n.split("-")[0] for n in names}
    order = rng.permutation(len(names))
    late = int(order[0]) if late_type else None
    rare = int(order[1]) if rare_type else None
    regular = (
        [int(i) for i in order[2:]] + ([] if late_type else [int(order[0])]) + ([] if rare_type else [int(order[1])])
    )
    type_of_slot = np.array(regular + [late if late is not None else -1, rare if rare is not None else -1])
    counts = _schedule(rng, n_files, regular, types_per_file, late, rare, rare_fraction, cells_per_file)
    batch_lfc = rng.normal(0.0, batch_strength, (n_files, n_genes))
    batch_lib = rng.lognormal(0.0, batch_strength, n_files)

    def write(path, types, batch_idx, file_tag, drop_genes):
        n = types.size
        library = rng.lognormal(np.log(library_size), 0.35, n) * batch_lib[batch_idx]
        X = sp.vstack(
            [
                _sample_counts(rng, log_p, types[batch_idx == b], library[batch_idx == b], batch_lfc[b], dispersion)
                for b in np.unique(batch_idx)
            ],
            format="csr",
        )
        # rows were grouped by batch: restore the cells' order
        perm = np.concatenate([np.flatnonzero(batch_idx == b) for b in np.unique(batch_idx)])
        X = X[np.argsort(perm)]
        obs = pd.DataFrame(
            {
                label_key: pd.Categorical([names[t] for t in types], categories=names),
                "lineage": pd.Categorical([lineage[names[t]] for t in types]),
                "batch": pd.Categorical([f"batch{b}" for b in batch_idx]),
            },
            index=[f"{file_tag}_cell{i:06d}" for i in range(n)],
        )
        write_file(path, X, obs, genes, rng, missing_gene_fraction, drop_genes)

    files = []
    for f in range(n_files):
        types = np.repeat(type_of_slot, counts[f])
        types = types[rng.permutation(types.size)]
        path = directory / f"stream_{f:03d}.h5ad"
        write(path, types, np.full(types.size, f), f"f{f:03d}", missing_gene_fraction > 0 and f % 2 == 1)
        files.append(path)
    holdout_types = np.repeat(np.arange(len(names)), holdout_per_type)
    holdout_types = holdout_types[rng.permutation(holdout_types.size)]
    holdout = directory / "holdout.h5ad"
    write(holdout, holdout_types, rng.integers(0, n_files, holdout_types.size), "holdout", False)
    result = SyntheticStream(
        files=files,
        holdout=holdout,
        types=names,
        lineage=lineage,
        late_type=names[late] if late is not None else None,
        rare_type=names[rare] if rare is not None else None,
        label_key=label_key,
        params=params,
    )
    record = asdict(result)
    record["files"] = [str(p) for p in files]
    record["holdout"] = str(holdout)
    manifest.write_text(json.dumps(record, indent=1))
    return result


_SHARED = (
    "n_files",
    "cells_per_file",
    "n_genes",
    "batch_strength",
    "library_size",
    "dispersion",
    "missing_gene_fraction",
    "random_state",
)


def _tahoe_mode(directory, params, overwrite, options):
    """``synthetic_stream(mode="tahoe")``: forward the shared options to :func:`tahoe_stream`."""
    from ._tahoe import tahoe_stream

    defaults = {k: p.default for k, p in inspect.signature(synthetic_stream).parameters.items() if k in params}
    changed = [k for k in params if k not in _SHARED and k != "label_key" and params[k] != defaults[k]]
    if changed:
        raise ValueError(f"options of mode='types' given with mode='tahoe': {changed}")
    kw = {k: params[k] for k in _SHARED}
    if params["label_key"] != defaults["label_key"]:
        kw["label_key"] = params["label_key"]
    return tahoe_stream(directory, **kw, **options, overwrite=overwrite)
