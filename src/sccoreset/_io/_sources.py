"""Resolve user inputs (paths, AnnData, MuData, views of them) into :class:`Source` objects.

Files are .h5ad / .h5mu (HDF5) or anndata zarr stores (directories); AnnData and MuData objects
are read in memory or, when backed, from their file; views of backed objects keep their rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._errors import InputError
from ._blocks import CSRBlock, ReadBuffers
from ._checks import PEEK_ROWS, non_integer_example
from ._nodes import SharedIndexes, close_store, is_group, open_store
from ._source import Source

try:  # optional at import time: mudata is a dependency, but keep the reader importable without it
    from mudata import MuData
except ImportError:  # pragma: no cover
    MuData = None  # type: ignore[assignment,misc]

__all__ = ["CSRBlock", "ReadBuffers", "Source", "as_sources", "close_all", "open_sources"]

FileLike = "str | os.PathLike | AnnData | MuData"


def _var_names(f: Any, prefix: str, name: str, indexes: SharedIndexes) -> pd.Index:
    try:
        var = f[f"{prefix}var"]
        key = var.attrs.get("_index", "_index")
        return indexes.from_node(var[key], f"{name}: var index")
    except KeyError as e:
        raise InputError(f"{name}: no {prefix}var index found; is this an AnnData file?") from e


def _matrix_shape(f: Any, key: str, name: str) -> tuple[int, int]:
    x = f[key]
    if not is_group(x):
        return tuple(x.shape)
    enc = x.attrs.get("encoding-type", "")
    if enc == "csc_matrix":
        raise InputError(
            f"{name}: {key} is stored as CSC; row blocks cannot be read without loading the whole matrix. "
            "Rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))."
        )
    if enc != "csr_matrix" or not {"data", "indices", "indptr"} <= set(x.keys()):
        raise InputError(f"{name}: {key} has unsupported encoding {enc!r} (expected csr_matrix or dense).")
    shape = tuple(int(v) for v in x.attrs["shape"])
    if x["indptr"].shape[0] != shape[0] + 1:
        raise InputError(f"{name}: {key}/indptr has the wrong length; is the file truncated?")
    return shape


def _choose_mod(f: Any, mod: str | None, name: str, var_hint: pd.Index | None) -> str:
    mods = sorted(f["mod"].keys()) if "mod" in f else []
    if mod is None and var_hint is not None:  # a modality of a backed MuData passed as AnnData: find which
        found = [m for m in mods if _var_names(f, f"mod/{m}/", name, SharedIndexes()).equals(var_hint)]
        if len(found) == 1:
            return found[0]
    if mod is None:
        raise InputError(f"{name}: is a MuData file; choose a modality with mod= (one of {mods}).")
    if mod not in mods:
        raise InputError(f"{name}: has no modality {mod!r} (modalities: {mods}).")
    return mod


def _source_from_path(
    path: Path,
    mod: str | None,
    indexes: SharedIndexes,
    *,
    layer: str | None = None,
    var_hint: pd.Index | None = None,
) -> Source:
    name = str(path)
    if not path.exists():
        raise InputError(f"{name}: file not found.")
    f = open_store(path, name)
    try:
        if path.suffix == ".h5mu" or ("mod" in f and "X" not in f):
            mod = _choose_mod(f, mod, name, var_hint)
            prefix = f"mod/{mod}/"
        else:
            mod, prefix = None, ""
        if layer is None:
            key = f"{prefix}X"
            if key not in f:
                raise InputError(f"{name}: has no {key} matrix.")
        else:
            key = f"{prefix}layers/{layer}"
            if key not in f:
                layers = sorted(f[f"{prefix}layers"].keys()) if f"{prefix}layers" in f else []
                raise InputError(f"{name}: has no layer {layer!r} (layers: {layers or 'none'}).")
        shape = _matrix_shape(f, key, name)
        var_names = _var_names(f, prefix, name, indexes)
        peek = _peek(f[key], shape[0])
    finally:
        close_store(f)
    if len(var_names) != shape[1]:
        raise InputError(f"{name}: {key} has {shape[1]} columns but var has {len(var_names)} names.")
    src = Source(name=name, n_obs=int(shape[0]), var_names=var_names, path=path, mod=mod, layer=layer)
    if peek is not None:
        src.peek_non_integer, src.peeked = peek[0], True
    return src


def _peek(x: Any, n_obs: int) -> tuple[float | None] | None:
    """The counts check of the first rows, while the file is open anyway (None: leave it to the stream)."""
    try:
        if not is_group(x):
            return (non_integer_example(np.asarray(x[: min(PEEK_ROWS, n_obs)]).ravel()),)
        ptr = x["indptr"][: min(PEEK_ROWS, n_obs) + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        if not 0 <= lo <= hi <= min(x["data"].shape[0], x["indices"].shape[0]):
            return None  # damaged: the stream's own read reports it, naming the rows
        return (non_integer_example(np.asarray(x["data"][lo:hi])),)
    except Exception:  # noqa: BLE001 - any damage is reported by the stream's read of these rows
        return None


def _view_rows(adata: AnnData, name: str) -> np.ndarray | None:
    """File rows of a view of a backed AnnData (None when it is not a view or keeps every row in order)."""
    if not adata.is_view:
        return None
    ref = adata._adata_ref
    if adata.n_vars != ref.n_vars or not adata.var_names.equals(ref.var_names):
        raise InputError(
            f"{name}: is a view that subsets genes (var: {adata.n_vars} of {ref.n_vars}); only cell (obs) views "
            "of backed data are read. Pass the whole object (genes not in the gene list are ignored anyway) "
            "or an in-memory copy (view.to_memory())."
        )
    rows = np.arange(ref.n_obs, dtype=np.int64)[adata._oidx]
    return None if np.array_equal(rows, np.arange(ref.n_obs)) else rows


def _with_rows(src: Source, rows: np.ndarray | None) -> Source:
    if rows is not None:
        src.rows = np.asarray(rows, dtype=np.int64)
        src.n_obs = int(src.rows.size)
        src.peeked = False  # the view's first rows are other rows
    return src


def _in_memory(name: str, adata: AnnData, layer: str | None) -> Source:
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{name}: has no layer {layer!r} (layers: {sorted(adata.layers) or 'none'}).")
    return Source(name=name, n_obs=adata.n_obs, var_names=adata.var_names.copy(), adata=adata, layer=layer)


def _as_source(i: int, item: Any, mod: str | None, layer: str | None, indexes: SharedIndexes) -> Source:
    if isinstance(item, str | os.PathLike):
        return _source_from_path(Path(item), mod, indexes, layer=layer)
    if MuData is not None and isinstance(item, MuData):
        if mod is None:
            raise InputError(f"MuData #{i}: choose a modality with mod= (one of {sorted(item.mod)}).")
        if mod not in item.mod:
            raise InputError(f"MuData #{i}: has no modality {mod!r} (modalities: {sorted(item.mod)}).")
        sub = item.mod[mod]
        if item.isbacked:
            src = _source_from_path(Path(item.filename), mod, indexes, layer=layer)
            return _with_rows(src, _view_rows(sub, f"{src.name} [{mod}]"))
        return _in_memory(f"MuData #{i} [{mod}]", sub, layer)
    if isinstance(item, AnnData):
        if item.isbacked:
            hint = item.var_names if mod is None else None
            src = _source_from_path(Path(item.filename), mod, indexes, layer=layer, var_hint=hint)
            return _with_rows(src, _view_rows(item, src.name))
        return _in_memory(f"AnnData #{i}", item, layer)
    raise InputError(
        f"files[{i}]: expected a path to .h5ad/.h5mu/.zarr, an AnnData or a MuData, got {type(item).__name__}."
    )


def as_sources(files: Sequence[Any] | Any, *, mod: str | None = None, layer: str | None = None) -> list[Source]:
    """Turn one input or a list of inputs into sources, validating what can be checked from metadata.

    Errors raised here name the input (its path, or ``AnnData #i`` for objects in memory). ``layer``
    reads counts from ``layers[layer]`` instead of ``X``.
    """
    if isinstance(files, str | os.PathLike | AnnData) or (MuData is not None and isinstance(files, MuData)):
        files = [files]
    files = list(files) if isinstance(files, Iterable) else [files]
    if not files:
        raise InputError("files: the list of inputs is empty.")
    sources = []
    indexes = SharedIndexes()
    for i, item in enumerate(files):
        src = _as_source(i, item, mod, layer, indexes)
        if src.n_obs == 0:
            raise InputError(f"{src.name}: contains no cells.")
        if src.var_names.has_duplicates:
            dups = src.var_names[src.var_names.duplicated()].unique()[:5].tolist()
            raise InputError(f"{src.name}: duplicate gene names in var_names, e.g. {dups}. Make them unique first.")
        sources.append(src)
    return sources


def close_all(sources: Iterable[Source]) -> None:
    for s in sources:
        s.close()


@contextmanager
def open_sources(
    files: Sequence[Any] | Any, *, mod: str | None = None, layer: str | None = None
) -> Iterator[list[Source]]:
    """:func:`as_sources` whose files are closed when the ``with`` block ends, however it ends."""
    sources = as_sources(files, mod=mod, layer=layer)
    try:
        yield sources
    finally:
        close_all(sources)
