"""Read anndata-encoded elements from HDF5 (h5py) or zarr stores alike.

Both libraries expose groups with ``keys()``/``attrs`` and arrays that slice into numpy arrays; the
differences (string decoding, ``read_direct``) are handled here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from .._errors import InputError
from ._vlen import heap_strings

try:
    from anndata.io import read_elem
except ImportError:  # anndata < 0.11
    from anndata.experimental import read_elem  # noqa: F401


def is_group(node: Any) -> bool:
    """True for an HDF5 or zarr group (a sparse matrix, a categorical, a dataframe)."""
    if isinstance(node, h5py.Group):
        return True
    return not isinstance(node, h5py.Dataset) and hasattr(node, "keys")


def open_store(path: Path, name: str) -> Any:
    """The root group of an .h5ad/.h5mu file (h5py.File) or of a zarr store (a directory)."""
    if path.is_dir():
        try:
            import zarr

            return zarr.open_group(str(path), mode="r")
        except Exception as e:
            raise InputError(f"{name}: is a directory but cannot be opened as a zarr store ({e}).") from e
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if path.suffix == ".zarr":
            raise InputError(f"{name}: a .zarr store should be a directory; this is a file ({e}).") from e
        raise InputError(f"{name}: cannot open as HDF5; is the file truncated or corrupt? ({e})") from e


def close_store(store: Any) -> None:
    if isinstance(store, h5py.File) and store.id.valid:
        store.close()


def read_slice_into(array: Any, lo: int, hi: int, out: np.ndarray) -> None:
    """Elements ``[lo, hi)`` of a 1-D stored array into ``out``."""
    if hi <= lo:
        return
    if isinstance(array, h5py.Dataset):
        array.read_direct(out, np.s_[lo:hi])
    else:
        out[...] = array[lo:hi]


def _strings(node: Any, start: int, stop: int) -> np.ndarray:
    if isinstance(node, h5py.Dataset):
        return np.asarray(node.asstr()[start:stop], dtype=object)
    values = np.asarray(node[start:stop])
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return values.astype(object)


def column_length(node: Any) -> int:
    """Rows of an anndata-encoded column, stored as a dataset or as a group (categorical, nullable)."""
    if is_group(node):
        for key in ("codes", "values"):
            if key in node:
                return int(node[key].shape[0])
        raise KeyError(f"{node.name}: no codes or values")
    return int(node.shape[0])


def read_column(node: Any, start: int, stop: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of an anndata-encoded column: (values as str objects, missing mask).

    Missing values (categorical code -1, a nullable array's mask, NaN in a float column, None) are
    None in ``values`` and True in the mask: they never become the string ``"nan"``.
    """
    if is_group(node):
        enc = node.attrs.get("encoding-type", "")
        if enc == "categorical":
            codes = np.asarray(node["codes"][start:stop])
            # categories may be a plain string array or (anndata 0.11 for string columns) a nullable one
            cats, _ = read_column(node["categories"], 0, column_length(node["categories"]), what)
            missing = codes < 0
            out = np.empty(codes.size, dtype=object)
            out[~missing] = cats[codes[~missing]]
            return out, missing
        if enc.startswith("nullable"):
            raw = node["values"]
            if enc == "nullable-string-array":
                values = _strings(raw, start, stop)
            else:
                values = np.asarray(raw[start:stop]).astype(str).astype(object)
            missing = np.asarray(node["mask"][start:stop], dtype=bool)
            values[missing] = None
            return values, missing
        raise InputError(f"{what}: unsupported encoding {enc!r}.")
    kind = node.dtype.kind
    if kind in ("S", "O", "U", "T"):
        values = _strings(node, start, stop)
        if kind in ("O", "T"):
            return values, np.fromiter((v is None for v in values), dtype=bool, count=values.size)
        return values, np.zeros(values.size, dtype=bool)
    raw = np.asarray(node[start:stop])
    missing = np.isnan(raw) if kind == "f" else np.zeros(raw.size, dtype=bool)
    values = raw.astype(str).astype(object)
    values[missing] = None
    return values, missing


def series_column(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An in-memory obs column as (values as str objects, missing mask), like :func:`read_column`."""
    missing = values.isna().to_numpy(dtype=bool)
    out = values.astype(object).to_numpy(dtype=object).copy()
    out[~missing] = [str(v) for v in out[~missing]]
    out[missing] = None
    return out, missing


class SharedIndexes:
    """One pd.Index object per distinct gene list: files with the same genes share it (and its column map)."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, pd.Index] = {}

    def get(self, names: np.ndarray) -> pd.Index:
        digest = hashlib.sha1("\0".join(names).encode()).digest()
        if digest not in self._by_digest:
            self._by_digest[digest] = pd.Index(names, dtype=object)
        return self._by_digest[digest]

    def from_node(self, node: Any, what: str) -> pd.Index:
        """The Index of a stored string column, decoding it only when its raw bytes are new.

        Variable-length strings are fingerprinted from the file's global heap (:func:`heap_strings`); a
        fingerprint is trusted once h5py's decoding of the same dataset gave exactly the same bytes.
        """
        if isinstance(node, h5py.Dataset) and node.dtype.kind == "O":
            heap = heap_strings(node)
            if heap is not None:
                lengths, data = heap
                # the count first: lengths and bytes of different lists can never run together
                count = len(lengths).to_bytes(8, "little")
                key = b"heap" + hashlib.sha1(count + lengths.tobytes() + data.tobytes()).digest()
                if key in self._by_digest:
                    return self._by_digest[key]
                raw = node[()]
                index = self._from_raw(raw, node, what)
                if np.array_equal(lengths, [len(b) for b in raw]) and data.tobytes() == b"".join(raw):
                    self._by_digest[key] = index
                return index
        if isinstance(node, h5py.Dataset) and node.dtype.kind in ("S", "O"):
            return self._from_raw(node[()], node, what)  # bytes: hashing them beats decoding 20,000 names
        return self.get(read_column(node, 0, column_length(node), what)[0])

    def _from_raw(self, raw: np.ndarray, node: Any, what: str) -> pd.Index:
        digest = hashlib.sha1(raw.tobytes() if raw.dtype.kind == "S" else b"\0".join(raw)).digest()
        key = b"raw" + digest
        if key not in self._by_digest:
            self._by_digest[key] = self.get(_decoded(raw, node, what))
        return self._by_digest[key]


def _decoded(raw: np.ndarray, node: Any, what: str) -> np.ndarray:
    """Variable-length strings already read as bytes, decoded as h5py's ``asstr`` decodes them (no second read)."""
    info = h5py.check_string_dtype(node.dtype)
    if raw.dtype.kind != "O" or info is None:
        return read_column(node, 0, node.shape[0], what)[0]
    return np.array([b.decode(info.encoding) if isinstance(b, bytes) else b for b in raw], dtype=object)
