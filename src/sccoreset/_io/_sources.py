"""Resolve user inputs (paths, AnnData, MuData) into sources that read row blocks of counts.

A :class:`Source` knows its display name (used in every error message), its gene names,
its number of cells and how to read one obs column or a contiguous block of rows of ``X``
as CSR arrays, without ever loading the whole matrix.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from anndata import AnnData

from .._errors import InputError
from ._direct import DirectDataset

try:  # optional at import time: mudata is a dependency, but keep the reader importable without it
    from mudata import MuData
except ImportError:  # pragma: no cover
    MuData = None  # type: ignore[assignment,misc]

FileLike = "str | os.PathLike | AnnData | MuData"


@dataclass
class CSRBlock:
    """Rows ``[start, stop)`` of a counts matrix as CSR arrays (``indptr`` starts at 0)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1


class ReadBuffers:
    """Growing data/indices arrays that consecutive reads fill one after another, then reuse."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._offsets: dict[str, int] = {}
        self._used = 0

    def reset(self) -> None:
        self._used = 0
        self._offsets = dict.fromkeys(self._offsets, 0)

    def take(self, n: int, data_dtype: np.dtype, index_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Views of the next ``n`` free elements; a grown array leaves earlier views on the old one intact."""
        out = []
        for key, dtype in (("data", data_dtype), ("indices", index_dtype)):
            arr = self._arrays.get(key)
            start = self._used - self._offsets.get(key, 0)
            if arr is None or arr.dtype != dtype or arr.size < start + n:
                self._arrays[key] = arr = np.empty(int((self._used + n) * 1.5) + 1024, dtype=dtype)
                self._offsets[key], start = self._used, 0
            out.append(arr[start : start + n])
        self._used += n
        return out[0], out[1]


@dataclass
class Source:
    """One input of the stream: a file on disk (``path``) or an AnnData in memory (``adata``)."""

    name: str
    n_obs: int
    var_names: pd.Index
    path: Path | None = None
    mod: str | None = None
    adata: AnnData | None = None
    _handle: h5py.File | None = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _direct: dict | None = field(default=None, repr=False)

    # -- layout -----------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"mod/{self.mod}/" if self.mod is not None else ""

    def _file(self) -> h5py.File:
        if self._handle is None or not self._handle.id.valid:
            if not self.path.exists():
                raise InputError(f"{self.name}: file no longer exists (it was there when the stream was scanned).")
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as e:
                raise InputError(f"{self.name}: cannot open as HDF5 ({e}).") from e
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._handle.id.valid:
            self._handle.close()
        self._handle = None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._direct = None

    def _direct_readers(self, x: h5py.Group) -> tuple[DirectDataset, DirectDataset] | None:
        """GIL-free readers of X/data and X/indices, when they are stored without filters."""
        if self._direct is None:
            data, indices = DirectDataset(x["data"]), DirectDataset(x["indices"])
            self._direct = {"readers": (data, indices) if data.usable and indices.usable else None}
            if self._direct["readers"] is not None:
                self._fd = os.open(self.path, os.O_RDONLY)
        return self._direct["readers"]

    # -- obs --------------------------------------------------------------------------------
    def obs_columns(self) -> list[str]:
        if self.adata is not None:
            return list(self.adata.obs.columns)
        group = self._file()[f"{self.prefix}obs"]
        return [k for k in group.keys() if k != group.attrs.get("_index", "_index")]

    def read_obs_column(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of obs column ``key`` for rows ``[start, stop)`` as an object array of strings."""
        stop = self.n_obs if stop is None else stop
        if self.adata is not None:
            if key not in self.adata.obs.columns:
                raise self._missing_column(key)
            return self.adata.obs[key].iloc[start:stop].astype(str).to_numpy(dtype=object)
        group = self._file()[f"{self.prefix}obs"]
        if key not in group:
            raise self._missing_column(key)
        return _read_string_slice(group[key], start, stop, f"{self.name}: obs column {key!r}")

    def read_obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_obs if stop is None else stop
        if self.adata is not None:
            return self.adata.obs_names[start:stop].to_numpy(dtype=object)
        group = self._file()[f"{self.prefix}obs"]
        return _read_string_slice(group[group.attrs.get("_index", "_index")], start, stop, f"{self.name}: obs index")

    def read_obs(self, rows: np.ndarray) -> pd.DataFrame:
        """The full obs rows ``rows`` (sorted, unique) of this source."""
        if self.adata is not None:
            return self.adata.obs.iloc[rows].copy()
        import anndata as ad

        obs = ad.io.read_elem(self._file()[f"{self.prefix}obs"])
        return obs.iloc[rows].copy()

    def _missing_column(self, key: str) -> InputError:
        cols = self.obs_columns()
        shown = ", ".join(map(repr, cols[:20])) + (" ..." if len(cols) > 20 else "")
        return InputError(f"{self.name}: obs has no column {key!r} (columns: {shown or 'none'}).")

    # -- X ----------------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int, buffers: ReadBuffers | None = None) -> CSRBlock:
        """Rows ``[start, stop)`` of ``X`` as CSR arrays, reading one contiguous slice.

        With ``buffers``, data and indices are read straight into (views of) those reused arrays,
        which avoids allocating and faulting in fresh memory for every block.
        """
        if self.adata is not None:
            return _block_from_matrix(self.adata.X[start:stop])
        try:
            x = self._file()[f"{self.prefix}X"]
            if isinstance(x, h5py.Dataset):
                return _block_from_matrix(x[start:stop])
            ptr = x["indptr"][start : stop + 1]
            lo, hi = int(ptr[0]), int(ptr[-1])
            if hi > x["data"].shape[0] or hi > x["indices"].shape[0] or lo > hi:
                raise InputError(f"{self.name}: X is truncated (rows {start}-{stop} point past the stored data).")
            if buffers is None:
                data = x["data"][lo:hi]
                indices = x["indices"][lo:hi]
            else:
                data, indices = buffers.take(hi - lo, x["data"].dtype, x["indices"].dtype)
                direct = self._direct_readers(x)
                if direct is not None:  # positioned reads release the GIL
                    direct[0].read_into(self._fd, lo, hi, data)
                    direct[1].read_into(self._fd, lo, hi, indices)
                elif hi > lo:
                    x["data"].read_direct(data, np.s_[lo:hi])
                    x["indices"].read_direct(indices, np.s_[lo:hi])
        except InputError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise InputError(f"{self.name}: cannot read rows {start}-{stop} of X ({e}); is the file truncated?") from e
        return CSRBlock(data, indices, (ptr - lo).astype(np.int64, copy=False))

    def read_rows_at(self, rows: np.ndarray) -> CSRBlock:
        """Arbitrary sorted rows of ``X``: one contiguous read per run of neighbouring rows."""
        import scipy.sparse as sp

        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return CSRBlock(np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        parts = []
        for run in np.split(rows, breaks):
            b = self.read_rows(int(run[0]), int(run[-1]) + 1)
            parts.append(sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.n_rows, len(self.var_names))))
        m = sp.vstack(parts, format="csr")
        return CSRBlock(m.data, m.indices, m.indptr.astype(np.int64))


def _block_from_matrix(x: Any) -> CSRBlock:
    import scipy.sparse as sp

    if sp.issparse(x):
        m = sp.csr_matrix(x)
    else:
        m = sp.csr_matrix(np.asarray(x))
    m.sort_indices()
    return CSRBlock(m.data, m.indices, m.indptr.astype(np.int64))


def _read_string_slice(node: h5py.Group | h5py.Dataset, start: int, stop: int, what: str) -> np.ndarray:
    """Read rows of an anndata-encoded obs column (categorical, string, numeric, nullable)."""
    if isinstance(node, h5py.Group):
        enc = node.attrs.get("encoding-type", "")
        if enc == "categorical":
            codes = node["codes"][start:stop]
            cats = _read_string_slice(node["categories"], 0, node["categories"].shape[0], what)
            out = np.empty(codes.size, dtype=object)
            valid = codes >= 0
            out[valid] = cats[codes[valid]]
            out[~valid] = "nan"
            return out
        if enc.startswith("nullable"):
            values = node["values"][start:stop].astype(str).astype(object)
            values[node["mask"][start:stop]] = "nan"
            return values
        raise InputError(f"{what}: unsupported encoding {enc!r}.")
    if node.dtype.kind in ("S", "O", "U"):
        return np.asarray(node.asstr()[start:stop], dtype=object)
    return node[start:stop].astype(str).astype(object)


class _SharedIndexes:
    """One pd.Index object per distinct gene list: files with the same genes share it (and its column map)."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, pd.Index] = {}

    def get(self, names: np.ndarray) -> pd.Index:
        digest = hashlib.sha1("\0".join(names).encode()).digest()
        if digest not in self._by_digest:
            self._by_digest[digest] = pd.Index(names, dtype=object)
        return self._by_digest[digest]

    def from_h5(self, node: h5py.Dataset | h5py.Group, what: str) -> pd.Index:
        """The Index of a stored string column, decoding it only when its raw bytes are new."""
        if isinstance(node, h5py.Dataset) and node.dtype.kind in ("S", "O"):
            raw = node[()]  # bytes: hashing them is much cheaper than decoding 20,000 names per file
            digest = hashlib.sha1(raw.tobytes() if raw.dtype.kind == "S" else b"\0".join(raw)).digest()
            key = b"raw" + digest
            if key not in self._by_digest:
                self._by_digest[key] = self.get(_read_string_slice(node, 0, node.shape[0], what))
            return self._by_digest[key]
        return self.get(_read_string_slice(node, 0, node.shape[0], what))


def _h5_var_names(f: h5py.File, prefix: str, name: str, indexes: _SharedIndexes) -> pd.Index:
    try:
        var = f[f"{prefix}var"]
        key = var.attrs.get("_index", "_index")
        return indexes.from_h5(var[key], f"{name}: var index")
    except KeyError as e:
        raise InputError(f"{name}: no {prefix}var index found; is this an AnnData file?") from e


def _source_from_path(path: Path, mod: str | None, indexes: _SharedIndexes) -> Source:
    name = str(path)
    if not path.exists():
        raise InputError(f"{name}: file not found.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{name}: cannot open as HDF5; is the file truncated or corrupt? ({e})") from e
    with f:
        is_mudata = "mod" in f and "X" not in f
        if path.suffix == ".h5mu" or is_mudata:
            mods = sorted(f["mod"].keys()) if "mod" in f else []
            if mod is None:
                raise InputError(f"{name}: is a MuData file; choose a modality with mod= (one of {mods}).")
            if mod not in mods:
                raise InputError(f"{name}: has no modality {mod!r} (modalities: {mods}).")
            prefix = f"mod/{mod}/"
        else:
            mod = None
            prefix = ""
        if f"{prefix}X" not in f:
            raise InputError(f"{name}: has no {prefix}X matrix.")
        x = f[f"{prefix}X"]
        if isinstance(x, h5py.Group):
            enc = x.attrs.get("encoding-type", "")
            if enc == "csc_matrix":
                raise InputError(
                    f"{name}: X is stored as CSC; row blocks cannot be read without loading the whole matrix. "
                    "Rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))."
                )
            if enc != "csr_matrix" or not {"data", "indices", "indptr"} <= set(x.keys()):
                raise InputError(f"{name}: X has unsupported encoding {enc!r} (expected csr_matrix or dense).")
            shape = tuple(x.attrs["shape"])
            if x["indptr"].shape[0] != shape[0] + 1:
                raise InputError(f"{name}: X/indptr has the wrong length; is the file truncated?")
        else:
            shape = x.shape
        var_names = _h5_var_names(f, prefix, name, indexes)
    if len(var_names) != shape[1]:
        raise InputError(f"{name}: X has {shape[1]} columns but var has {len(var_names)} names.")
    return Source(name=name, n_obs=int(shape[0]), var_names=var_names, path=path, mod=mod)


def as_sources(files: Sequence[Any] | Any, *, mod: str | None = None) -> list[Source]:
    """Turn one input or a list of inputs into sources, validating what can be checked from metadata.

    Errors raised here name the input (its path, or ``AnnData #i`` for objects in memory).
    """
    if isinstance(files, str | os.PathLike | AnnData) or (MuData is not None and isinstance(files, MuData)):
        files = [files]
    files = list(files) if isinstance(files, Iterable) else [files]
    if not files:
        raise InputError("files: the list of inputs is empty.")
    sources = []
    indexes = _SharedIndexes()
    for i, item in enumerate(files):
        if isinstance(item, str | os.PathLike):
            src = _source_from_path(Path(item), mod, indexes)
        elif MuData is not None and isinstance(item, MuData):
            if mod is None:
                raise InputError(f"MuData #{i}: choose a modality with mod= (one of {sorted(item.mod)}).")
            if mod not in item.mod:
                raise InputError(f"MuData #{i}: has no modality {mod!r} (modalities: {sorted(item.mod)}).")
            sub = item.mod[mod]
            if item.isbacked:
                src = _source_from_path(Path(item.filename), mod, indexes)
            else:
                src = Source(name=f"MuData #{i} [{mod}]", n_obs=sub.n_obs, var_names=sub.var_names.copy(), adata=sub)
        elif isinstance(item, AnnData):
            if item.isbacked:
                src = _source_from_path(Path(item.filename), None, indexes)
            else:
                src = Source(name=f"AnnData #{i}", n_obs=item.n_obs, var_names=item.var_names.copy(), adata=item)
        else:
            raise InputError(
                f"files[{i}]: expected a path to .h5ad/.h5mu, an AnnData or a MuData, got {type(item).__name__}."
            )
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
