"""Some rows of an h5ad obs frame, read column by column without loading the whole frame.

At the end of a stream the coreset needs the obs of a few thousand cells spread over many files;
reading every file's whole obs for that costs seconds on long streams. Columns in the common anndata
encodings (categorical, numeric and string arrays, nullable integer/boolean) are sliced over the span
of the wanted rows; any other encoding makes the caller fall back to reading the whole frame.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd


class UnsupportedEncoding(Exception):
    """A column this reader does not slice; read the whole frame instead."""


def _dataset_rows(ds: h5py.Dataset, sel: np.ndarray, lo: int, hi: int) -> np.ndarray:
    if ds.dtype.kind in ("S", "O"):
        if 8 * sel.size < hi - lo:  # a few names spread over a long span: decode only those
            return np.asarray(ds.asstr()[np.asarray(sel + lo)], dtype=object)
        return np.asarray(ds.asstr()[lo:hi], dtype=object)[sel]
    if ds.ndim != 1:
        raise UnsupportedEncoding(ds.name)
    return np.asarray(ds[lo:hi])[sel]


def _column_rows(node, sel: np.ndarray, lo: int, hi: int):
    if isinstance(node, h5py.Dataset):
        return _dataset_rows(node, sel, lo, hi)
    enc = node.attrs.get("encoding-type", "")
    if enc == "categorical":
        codes = np.asarray(node["codes"][lo:hi])[sel]
        cats_node = node["categories"]
        if not isinstance(cats_node, h5py.Dataset):
            raise UnsupportedEncoding(f"{node.name}: categories stored as {cats_node.attrs.get('encoding-type')!r}")
        cats = _dataset_rows(cats_node, np.arange(cats_node.shape[0]), 0, cats_node.shape[0])
        return pd.Categorical.from_codes(codes, categories=pd.Index(cats), ordered=bool(node.attrs.get("ordered")))
    if enc in ("nullable-integer", "nullable-boolean"):
        values = np.asarray(node["values"][lo:hi])[sel]
        mask = np.asarray(node["mask"][lo:hi])[sel].astype(bool)
        return (
            pd.arrays.BooleanArray(values, mask) if enc == "nullable-boolean" else pd.arrays.IntegerArray(values, mask)
        )
    raise UnsupportedEncoding(f"{node.name}: {enc!r}")


def read_obs_rows(group: h5py.Group, rows: np.ndarray) -> pd.DataFrame:
    """Obs rows ``rows`` (sorted, unique) of an h5ad obs group, indexed by obs name, columns in their stored order.

    Raises :class:`UnsupportedEncoding` for a column it cannot slice.
    """
    if not isinstance(group, h5py.Group) or group.attrs.get("encoding-type", "dataframe") != "dataframe":
        raise UnsupportedEncoding("obs is not an h5py dataframe group")
    rows = np.asarray(rows, dtype=np.int64)
    lo, hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
    sel = rows - lo
    index_key = group.attrs.get("_index", "_index")
    names = _column_rows(group[index_key], sel, lo, hi)
    order = [str(c) for c in np.atleast_1d(group.attrs.get("column-order", []))]
    data = {c: _column_rows(group[c], sel, lo, hi) for c in order}
    return pd.DataFrame(data, index=pd.Index(np.asarray(names, dtype=object).astype(str), dtype=object))
