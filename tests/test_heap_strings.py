"""Gene names read straight from the HDF5 global heap equal h5py's decoding, and files with one gene list share it."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sccoreset._io._nodes import SharedIndexes
from sccoreset._io._sources import as_sources, close_all
from sccoreset._io._vlen import heap_strings
from sccoreset._utils import h5ad_safe_strings

# HDF5 strings hold no NUL; surrogates cannot be encoded
chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
names = st.lists(st.text(chars, min_size=0, max_size=40), min_size=0, max_size=300)


def _write(path, values, **kw):
    with h5py.File(path, "w", **kw) as f:
        f.create_dataset("s", data=np.array(values, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("pad", data=np.arange(10))  # another object between heap collections
        f.create_dataset("t", data=np.array(values[::-1], dtype=object), dtype=h5py.string_dtype())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=names)
def test_heap_bytes_equal_h5py(tmp_path, values):
    path = tmp_path / "s.h5"
    _write(path, values)
    with h5py.File(path, "r") as f:
        for key in ("s", "t"):
            got = heap_strings(f[key])
            assert got is not None, "the fast path should apply to a contiguous, unfiltered dataset"
            lengths, data = got
            want = [v if isinstance(v, bytes) else v.encode() for v in f[key][()]]
            assert lengths.tolist() == [len(v) for v in want]
            assert data.tobytes() == b"".join(want)


def test_many_collections(tmp_path):
    """Tens of thousands of names spread over several heap collections, in order."""
    values = [f"GENE{i}-{'x' * (i % 13)}" for i in range(40_000)]
    path = tmp_path / "big.h5"
    _write(path, values)
    with h5py.File(path, "r") as f:
        lengths, data = heap_strings(f["s"])
    assert data.tobytes() == "".join(values).encode()
    assert lengths.tolist() == [len(v) for v in values]


def test_not_applicable_falls_back(tmp_path):
    """Chunked/compressed storage and a userblock are left to h5py (None), never misread."""
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype(), compression="gzip")
    with h5py.File(path, "r") as f:
        assert heap_strings(f["s"]) is None
    path = tmp_path / "u.h5"
    _write(path, ["a", "bc"], userblock_size=512)
    with h5py.File(path, "r") as f:
        assert heap_strings(f["s"]) is None


# damage to the first heap collection: (offset from its start, new bytes given the file's length)
DAMAGE = {
    "signature overwritten": (0, lambda size: b"XXXX"),
    "collection larger than the file": (8, lambda size: (size * 4).to_bytes(8, "little")),
    "object size 2**63 - 8 (overflows a bounds check)": (24, lambda size: ((1 << 63) - 8).to_bytes(8, "little")),
    "object size 2**64 - 1": (24, lambda size: ((1 << 64) - 1).to_bytes(8, "little")),
    "object size 2**40": (24, lambda size: (1 << 40).to_bytes(8, "little")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_heap_is_refused(tmp_path, damage):
    """A damaged heap is not parsed (h5py's reading then decides), and nothing is read past the heap."""
    path = tmp_path / "d.h5"
    _write(path, [f"gene{i}" for i in range(50)])
    with h5py.File(path, "r") as f:
        offset = f["s"].id.get_offset()
    raw = bytearray(path.read_bytes())
    address = int.from_bytes(raw[offset + 4 : offset + 12], "little")  # the first element's collection
    assert raw[address : address + 4] == b"GCOL"
    at, new_bytes = DAMAGE[damage]
    patch = new_bytes(len(raw))
    raw[address + at : address + at + len(patch)] = patch
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f:
        assert heap_strings(f["s"]) is None


def test_files_in_memory_are_left_to_h5py(tmp_path):
    path = tmp_path / "m.h5"
    _write(path, ["alpha", "beta"])
    with h5py.File(path, "r", driver="core") as f:
        assert heap_strings(f["s"]) is None


def _h5ad(path, genes):
    X = sp.csr_matrix(np.ones((3, len(genes)), dtype=np.float32))
    a = ad.AnnData(X=X, var=h5ad_safe_strings(pd.DataFrame(index=genes)))
    a.obs_names = [f"c{i}" for i in range(3)]
    a.write_h5ad(path)
    return path


def test_files_with_one_gene_list_share_an_index(tmp_path):
    genes = [f"g{i}" for i in range(50)]
    other = genes[:-1] + ["g_other"]
    paths = [_h5ad(tmp_path / f"{k}.h5ad", g) for k, g in enumerate([genes, genes, other, genes[::-1]])]
    sources = as_sources(paths)
    try:
        assert sources[0].var_names is sources[1].var_names
        assert sources[2].var_names is not sources[0].var_names
        for src, g in zip(sources, [genes, genes, other, genes[::-1]], strict=True):
            assert src.var_names.tolist() == g
    finally:
        close_all(sources)


def test_new_gene_lists_are_decoded_like_h5py(tmp_path):
    genes = ["CD3E", "résumé-1", "基因", "", "IL7R"]
    sources = as_sources([_h5ad(tmp_path / "u.h5ad", genes)])
    try:
        with h5py.File(tmp_path / "u.h5ad", "r") as f:
            want = [str(v) for v in f["var/_index"].asstr()[()]]
        assert sources[0].var_names.tolist() == want == genes
    finally:
        close_all(sources)


def test_shared_indexes_trust_only_verified_fingerprints(tmp_path, monkeypatch):
    """When the heap bytes disagree with h5py's decoding, the names come from h5py and nothing is cached."""
    path = _h5ad(tmp_path / "a.h5ad", ["x", "y", "z"])
    monkeypatch.setattr(
        "sccoreset._io._nodes.heap_strings", lambda node: (np.array([1, 1, 1]), np.frombuffer(b"xyq", np.uint8))
    )
    shared = SharedIndexes()
    with h5py.File(path, "r") as f:
        index = shared.from_node(f["var/_index"], "a.h5ad: var index")
    assert index.tolist() == ["x", "y", "z"]
    assert not any(key.startswith(b"heap") for key in shared._by_digest)


@pytest.mark.parametrize("value", [b"\xff\xfe".decode("latin-1"), "résumé", "基因"])
def test_non_ascii_names(tmp_path, value):
    path = tmp_path / "n.h5"
    _write(path, [value, "", value * 3])
    with h5py.File(path, "r") as f:
        lengths, data = heap_strings(f["s"])
    assert data.tobytes() == (value + value * 3).encode()
    assert lengths.tolist() == [len(value.encode()), 0, 3 * len(value.encode())]
