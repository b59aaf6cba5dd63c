"""Reader hardening (issue 8): views, missing labels, positioned reads, corrupt indices, zarr, layers."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sccoreset as scc
from sccoreset._errors import InputError
from sccoreset._io._labels import MissingLabelsWarning
from sccoreset._io._sources import as_sources, open_sources
from sccoreset._utils import h5ad_safe_strings

N_OBS, N_GENES = 400, 60


def _counts(seed: int = 0, n_obs: int = N_OBS) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.random(n_obs, N_GENES, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    obs = pd.DataFrame(
        {"label": pd.Categorical(rng.choice(["a", "b", "c"], n_obs))}, index=[f"cell{i}" for i in range(n_obs)]
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    return ad.AnnData(X=X, obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(var))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    a = _counts()
    path = d / "a.h5ad"
    a.write_h5ad(path)
    gs = scc.pp.fit_gene_space([path], n_top_genes=30)
    return a, path, gs


def _stack(chunks):
    chunks = list(chunks)
    return (
        np.concatenate([c.X for c in chunks]),
        np.concatenate([c.row for c in chunks]),
        np.concatenate([c.labels for c in chunks]) if chunks[0].labels is not None else None,
    )


# -- 1. views -----------------------------------------------------------------------------
@pytest.mark.parametrize("index", [slice(0, 100), slice(150, 260), [5, 6, 7, 300, 301, 2, 399], "mask"])
def test_backed_view_reads_its_own_rows(data, index):
    a, path, gs = data
    backed = ad.read_h5ad(path, backed="r")
    if isinstance(index, str):
        index = np.arange(N_OBS) % 3 == 0
    view = backed[index]
    rows = np.arange(N_OBS)[index]
    info = scc.pp.scan([view], "label")
    assert info.n_cells == rows.size
    assert info.label_counts.to_numpy().sum() == rows.size
    X, got_rows, labels = _stack(scc.pp.iter_chunks([view], gs, chunk_size=37, label_key="label", prefetch=0))
    np.testing.assert_array_equal(got_rows, rows)  # provenance: rows of the file on disk
    np.testing.assert_array_equal(X, gs.transform(a.X[rows], a.var_names))
    np.testing.assert_array_equal(labels, a.obs["label"].astype(str).to_numpy()[rows])
    # what tl/_coreset.py does with provenance: physical rows read back raw counts and obs
    (src,) = as_sources([view])
    keep = np.sort(rows[::2])
    block = src.read_rows_at(keep)
    m = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(keep.size, N_GENES))
    np.testing.assert_array_equal(m.toarray(), a.X[keep].toarray())
    assert list(src.read_obs(keep).index) == list(a.obs_names[keep])
    src.close()
    backed.file.close()


def test_backed_mudata_view_reads_its_own_rows(tmp_path, data):
    a, _, gs = data
    path = tmp_path / "m.h5mu"
    md.MuData({"rna": a}).write(path)
    mdata = md.read_h5mu(path, backed=True)
    assert scc.pp.scan([mdata[:100]], "label", mod="rna").n_cells == 100
    assert scc.pp.scan([mdata[:100].mod["rna"]], "label").n_cells == 100  # modality found from the view
    X, rows, _ = _stack(scc.pp.iter_chunks([mdata[50:120]], gs, chunk_size=30, mod="rna"))
    np.testing.assert_array_equal(rows, np.arange(50, 120))
    np.testing.assert_array_equal(X, gs.transform(a.X[50:120], a.var_names))


def test_var_subsetting_backed_view_is_refused(data):
    _, path, _ = data
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(InputError, match=r"a\.h5ad: is a view that subsets genes"):
        scc.pp.scan([backed[:, :10]])


def test_in_memory_view_still_reads_itself(data):
    a, _, gs = data
    view = a[100:180]
    X, rows, _ = _stack(scc.pp.iter_chunks([view], gs, chunk_size=50))
    np.testing.assert_array_equal(rows, np.arange(80))  # rows of the object passed
    np.testing.assert_array_equal(X, gs.transform(a.X[100:180], a.var_names))


# -- 2. missing labels --------------------------------------------------------------------
def _with_missing(tmp_path, kind: str):
    a = _counts(1)
    labels = a.obs["label"].astype(object).to_numpy()
    missing = np.zeros(N_OBS, bool)
    missing[[3, 4, 250, 399]] = True
    if kind == "categorical":
        col = pd.Categorical(np.where(missing, None, labels), categories=["a", "b", "c"])
    elif kind == "float":
        col = np.where(missing, np.nan, (labels == "a").astype(float) + 1.0)
    else:  # nullable strings (anndata < 0.12 cannot write them: skip there)
        if not hasattr(ad.settings, "allow_write_nullable_strings"):
            pytest.skip("this anndata cannot write nullable string columns")
        col = pd.array(np.where(missing, None, labels), dtype="string")
    a.obs["label"] = col
    path = tmp_path / f"missing_{kind}.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "nullable":
            with ad.settings.override(allow_write_nullable_strings=True):
                a.write_h5ad(path)
        else:
            a.write_h5ad(path)
    return a, path, missing


@pytest.mark.parametrize("kind", ["categorical", "float", "nullable"])
def test_missing_labels_are_skipped_with_a_warning(tmp_path, data, kind):
    _, _, gs = data
    a, path, missing = _with_missing(tmp_path, kind)
    with pytest.warns(MissingLabelsWarning, match=rf"4 cells with a missing label.*missing_{kind}\.h5ad: 4"):
        info = scc.pp.scan([path], "label")
    assert "nan" not in info.labels and "None" not in info.labels
    assert info.n_missing.tolist() == [4] and info.label_counts.to_numpy().sum() == N_OBS - 4
    with pytest.warns(MissingLabelsWarning):
        chunks = list(scc.pp.iter_chunks([path], gs, chunk_size=100, label_key="label", order="block_shuffle"))
    assert sum(c.n_skipped for c in chunks) == 4
    X, rows, labels = _stack(chunks)
    assert rows.size == N_OBS - 4 and not missing[rows].any()
    assert all(isinstance(v, str) and v not in ("nan", "None") for v in labels)
    np.testing.assert_array_equal(X, gs.transform(a.X[rows], a.var_names))


def test_missing_labels_error_names_file_column_count_and_row(tmp_path, data):
    _, _, gs = data
    _, path, _ = _with_missing(tmp_path, "categorical")
    msg = r"missing_categorical\.h5ad: obs\['label'\] is missing \(NaN/None\) for 4 cells, first in row 3"
    with pytest.raises(InputError, match=msg):
        scc.pp.scan([path], "label", missing_labels="error")
    with pytest.raises(InputError, match=msg):
        next(scc.pp.iter_chunks([path], gs, label_key="label", missing_labels="error"))
    with pytest.raises(InputError, match="missing_labels must be one of"):
        scc.pp.scan([path], "label", missing_labels="drop")


def test_missing_labels_in_memory(data):
    _, _, gs = data
    a = _counts(2)
    a.obs["label"] = a.obs["label"].cat.add_categories([]).astype(object)
    a.obs.loc[a.obs_names[[0, 10]], "label"] = None
    with pytest.warns(MissingLabelsWarning, match=r"AnnData #0: 2"):
        info = scc.pp.scan([a], "label")
    assert set(info.labels) == {"a", "b", "c"}
    with pytest.warns(MissingLabelsWarning):
        _, rows, _ = _stack(scc.pp.iter_chunks([a], gs, label_key="label", chunk_size=64))
    assert 0 not in rows and 10 not in rows and rows.size == N_OBS - 2


# -- 3. positioned reads --------------------------------------------------------------------
def test_h5mu_with_userblock_reads_like_h5ad(tmp_path, data):
    a, path, gs = data
    mpath = tmp_path / "ub.h5mu"
    md.MuData({"rna": a}).write(mpath)
    with h5py.File(mpath) as f:
        assert f.userblock_size > 0 and f["mod/rna/X/data"].chunks is not None
    want = np.concatenate([c.X for c in scc.pp.iter_chunks([path], gs, chunk_size=64)])
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([mpath], gs, chunk_size=64, mod="rna")])
    np.testing.assert_array_equal(got, want)


def test_old_hdf5_and_wrong_chunk_addresses_fall_back_to_h5py(tmp_path, data, monkeypatch):
    from sccoreset._io import _direct

    a, path, gs = data
    mpath = tmp_path / "old.h5mu"
    md.MuData({"rna": a}).write(mpath)
    want = gs.transform(a.X, a.var_names)
    monkeypatch.setattr(_direct.h5py.version, "hdf5_version_tuple", (1, 14, 2))
    with h5py.File(mpath) as f:
        assert not _direct.DirectDataset(f["mod/rna/X/data"]).usable  # userblock: not trusted
    with h5py.File(path) as f:
        assert _direct.DirectDataset(f["X/data"]).usable  # no userblock: trusted
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([mpath], gs, chunk_size=64, mod="rna")])
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(_direct, "has_chunk_iter", lambda ds: False)  # h5py without chunk_iter
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([path], gs, chunk_size=64)])
    np.testing.assert_array_equal(got, want)
    # HDF5 issue 3003 itself: offsets off by the userblock; the check against h5py catches it
    monkeypatch.undo()
    real_init = _direct.DirectDataset.__init__

    def shifted(self, dataset):
        real_init(self, dataset)
        if self.usable:
            self.offsets = self.offsets - 512

    monkeypatch.setattr(_direct.DirectDataset, "__init__", shifted)
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([mpath], gs, chunk_size=64, mod="rna")])
    np.testing.assert_array_equal(got, want)


# -- 4. corrupt indices -------------------------------------------------------------------
def test_out_of_range_indices_raise_naming_file_and_row(tmp_path, data):
    a, _, gs = data
    path = tmp_path / "bad_indices.h5ad"
    a.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        row = 5
        f["X/indices"][int(f["X/indptr"][row])] = 1_000_000
    for prefetch in (0, 1):
        with pytest.raises(InputError, match=r"bad_indices\.h5ad: X/indices out of range.*row 5"):
            list(scc.pp.iter_chunks([path], gs, chunk_size=64, prefetch=prefetch))
    with pytest.raises(InputError, match=r"bad_indices\.h5ad: X/indices out of range.*row 5"):
        scc.pp.fit_gene_space([path], n_top_genes=10)
    with h5py.File(path, "r+") as f:
        f["X/indices"][int(f["X/indptr"][row])] = -3
    with pytest.raises(InputError, match=r"X/indices out of range.*row 5"):
        list(scc.pp.iter_chunks([path], gs, chunk_size=64))


def test_decreasing_indptr_raises(tmp_path, data):
    a, _, gs = data
    path = tmp_path / "bad_indptr.h5ad"
    a.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["X/indptr"][10] = f["X/indptr"][12] + 5
    with pytest.raises(InputError, match=r"bad_indptr\.h5ad: X/indptr is decreasing.*row (9|10)"):
        list(scc.pp.iter_chunks([path], gs, chunk_size=64))


# -- 5. zarr ------------------------------------------------------------------------------
@pytest.mark.parametrize(("dense", "zarr_format"), [(False, 2), (True, 2), (False, 3)])
def test_zarr_store_reads_like_h5ad(tmp_path, data, dense, zarr_format):
    if not hasattr(ad.settings, "zarr_write_format"):
        pytest.skip("this anndata cannot choose the zarr format it writes")
    a, path, gs = data
    z = a.copy()
    if dense:
        z.X = z.X.toarray()
    zpath = tmp_path / "a.zarr"
    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=zarr_format):
        warnings.simplefilter("ignore")  # anndata's note on the zarr v2 default
        z.write_zarr(zpath)
    info = scc.pp.scan([zpath], "label")
    assert info.n_cells == N_OBS and info.labels == ["a", "b", "c"]
    for order in ("sequential", "block_shuffle"):
        kw = dict(chunk_size=70, label_key="label", order=order, prefetch=1)
        want = list(scc.pp.iter_chunks([path], gs, **kw))
        got = list(scc.pp.iter_chunks([zpath], gs, **kw))
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(g.X, w.X)
            np.testing.assert_array_equal(g.row, w.row)
            np.testing.assert_array_equal(g.labels, w.labels)
            np.testing.assert_array_equal(g.obs_names, w.obs_names)
    gz = scc.pp.fit_gene_space([zpath], n_top_genes=30)
    assert list(gz.genes) == list(gs.genes)
    np.testing.assert_allclose(gz.mean, gs.mean)
    (src,) = as_sources([zpath])
    assert list(src.read_obs(np.array([1, 7])).index) == ["cell1", "cell7"]


# -- 6. layers ----------------------------------------------------------------------------
def test_layer_is_read_instead_of_x(tmp_path, data):
    a, path, gs = data
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = sp.csr_matrix(np.log1p(b.X.toarray()))
    lpath = tmp_path / "layer.h5ad"
    b.write_h5ad(lpath)
    want = np.concatenate([c.X for c in scc.pp.iter_chunks([path], gs, chunk_size=64)])
    for item in (lpath, b, ad.read_h5ad(lpath, backed="r")):
        got = np.concatenate([c.X for c in scc.pp.iter_chunks([item], gs, chunk_size=64, layer="counts")])
        np.testing.assert_array_equal(got, want)
    mpath = tmp_path / "layer.h5mu"
    md.MuData({"rna": b}).write(mpath)
    got = np.concatenate([c.X for c in scc.pp.iter_chunks([mpath], gs, chunk_size=64, mod="rna", layer="counts")])
    np.testing.assert_array_equal(got, want)
    g2 = scc.pp.fit_gene_space([lpath], n_top_genes=30, layer="counts")
    assert list(g2.genes) == list(gs.genes)
    assert scc.pp.scan([lpath], layer="counts").n_cells == N_OBS
    with pytest.raises(InputError, match=r"layer\.h5ad: has no layer 'raw' \(layers: \['counts'\]\)"):
        scc.pp.scan([lpath], layer="raw")
    with pytest.raises(InputError, match=r"AnnData #0: has no layer 'raw' \(layers: \['counts'\]\)"):
        scc.pp.scan([b], layer="raw")


# -- 7. open_sources ----------------------------------------------------------------------
def test_open_sources_closes_on_error(data):
    _, path, _ = data
    seen = {}

    def use_then_fail():
        with open_sources([path, path]) as sources:
            for s in sources:
                s.read_rows(0, 10)
            seen["sources"], seen["handles"] = sources, [s._handle for s in sources]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_then_fail()
    assert all(s._handle is None for s in seen["sources"])
    assert not any(h.id.valid for h in seen["handles"])


def test_indexes_stored_as_nullable_strings(tmp_path, rng):
    """anndata 0.12 under pandas' string dtype writes obs/var names as nullable string groups: read them."""
    from .conftest import random_counts

    if not hasattr(ad.settings, "allow_write_nullable_strings"):
        pytest.skip("this anndata cannot write nullable string columns")
    a = random_counts(rng, 50, [f"g{i}" for i in range(30)])
    a.obs_names = pd.Index([f"c{i}" for i in range(50)], dtype="string")
    a.var_names = pd.Index([f"g{i}" for i in range(30)], dtype="string")
    path = tmp_path / "nullable_index.h5ad"
    with ad.settings.override(allow_write_nullable_strings=True):
        a.write_h5ad(path)
    with h5py.File(path) as f:
        if not isinstance(f["var"][f["var"].attrs["_index"]], h5py.Group):
            pytest.skip("this anndata writes string indexes as plain datasets")
    gs = scc.pp.fit_gene_space([path], n_top_genes=10)
    chunks = list(scc.pp.iter_chunks([path], gs, label_key="label", chunk_size=20))
    assert sum(len(c) for c in chunks) == 50
    assert list(np.concatenate([c.obs_names for c in chunks])) == [f"c{i}" for i in range(50)]
