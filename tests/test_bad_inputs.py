"""Every bad input gets an InputError naming the file, column or parameter, before any work is done."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sccoreset as scc
from sccoreset import InputError

from .conftest import random_counts


@pytest.fixture
def good(tmp_path, rng):
    a = random_counts(rng, 50, [f"g{i}" for i in range(40)])
    path = tmp_path / "good.h5ad"
    a.write_h5ad(path)
    return a, path


def _write(tmp_path, adata, name):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def test_missing_label_column(good):
    _, path = good
    with pytest.raises(InputError, match=r"good\.h5ad: obs has no column 'cell_type'.*'label'"):
        scc.pp.scan([path], "cell_type")
    gs = scc.pp.fit_gene_space([path], n_top_genes=10)
    with pytest.raises(InputError, match="no column 'nope'"):
        next(scc.pp.iter_chunks([path], gs, label_key="nope"))


@pytest.mark.parametrize(("value", "what"), [(np.nan, "nan"), (np.inf, "inf"), (-1.0, "negative")])
def test_non_finite_or_negative_values(tmp_path, good, value, what):
    a, _ = good
    bad = a.copy()
    X = bad.X.toarray()
    X[7, 3] = value
    bad.X = sp.csr_matrix(X)
    path = _write(tmp_path, bad, f"bad_{what}.h5ad")
    with pytest.raises(InputError, match=rf"bad_{what}\.h5ad: X holds negative or non-finite.*row 7"):
        scc.pp.fit_gene_space([path], n_top_genes=10)
    gs = scc.pp.fit_gene_space([good[1]], n_top_genes=10)
    with pytest.raises(InputError, match=rf"bad_{what}\.h5ad: X holds negative or non-finite.*row 7"):
        list(scc.pp.iter_chunks([path], gs, chunk_size=20))


def test_duplicate_gene_names(tmp_path, good):
    a, _ = good
    dup = a.copy()
    dup.var_names = ["g0", *dup.var_names[1:-1], "g0"]
    path = _write(tmp_path, dup, "dup.h5ad")
    with pytest.raises(InputError, match=r"dup\.h5ad: duplicate gene names.*g0"):
        scc.pp.scan([path])


def test_no_overlap_with_gene_list(tmp_path, good):
    a, path = good
    other = a.copy()
    other.var_names = [f"ENSG{i}" for i in range(a.n_vars)]
    other_path = _write(tmp_path, other, "ensembl.h5ad")
    gs = scc.pp.fit_gene_space([path], n_top_genes=10)
    with pytest.raises(InputError, match=r"ensembl\.h5ad: none of its 40 genes is in the gene list"):
        next(scc.pp.iter_chunks([path, other_path], gs))


def test_empty_file(tmp_path, good):
    a, _ = good
    path = _write(tmp_path, a[:0].copy(), "empty.h5ad")
    with pytest.raises(InputError, match=r"empty\.h5ad: contains no cells"):
        scc.pp.scan([path])


def test_truncated_and_corrupt_files(tmp_path, good):
    _, path = good
    raw = path.read_bytes()
    trunc = tmp_path / "truncated.h5ad"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"truncated\.h5ad: cannot open as HDF5"):
        scc.pp.scan([trunc])
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not an hdf5 file")
    with pytest.raises(InputError, match=r"junk\.h5ad: cannot open as HDF5"):
        scc.pp.scan([junk])
    with pytest.raises(InputError, match=r"missing\.h5ad: file not found"):
        scc.pp.scan([tmp_path / "missing.h5ad"])


def test_h5mu_without_mod(tmp_path, good):
    a, _ = good
    md.MuData({"rna": a}).write(tmp_path / "x.h5mu")
    with pytest.raises(InputError, match=r"x\.h5mu: is a MuData file; choose a modality with mod=.*rna"):
        scc.pp.scan([tmp_path / "x.h5mu"])
    with pytest.raises(InputError, match="no modality 'atac'"):
        scc.pp.scan([tmp_path / "x.h5mu"], mod="atac")
    with pytest.raises(InputError, match="MuData #0: choose a modality"):
        scc.pp.scan([md.MuData({"rna": a})])


def test_csc_matrix_is_refused(tmp_path, good):
    a, _ = good
    csc = a.copy()
    csc.X = csc.X.tocsc()
    path = _write(tmp_path, csc, "csc.h5ad")
    with pytest.raises(InputError, match=r"csc\.h5ad: X is stored as CSC"):
        scc.pp.scan([path])


def test_label_not_in_given_set(good):
    from sccoreset._io._sources import as_sources
    from sccoreset.pp._scan import scan_sources

    _, path = good
    with pytest.raises(
        InputError, match=r"good\.h5ad: obs\['label'\] holds labels not in the given label set: \['c'\]"
    ):
        scan_sources(as_sources([path]), "label", classes=["a", "b"])


def test_bad_parameters(good):
    _, path = good
    with pytest.raises(InputError, match="n_top_genes must be positive"):
        scc.pp.fit_gene_space([path], n_top_genes=0)
    gs = scc.pp.fit_gene_space([path], n_top_genes=10)
    with pytest.raises(InputError, match="chunk_size must be positive"):
        next(scc.pp.iter_chunks([path], gs, chunk_size=0))
    with pytest.raises(InputError, match="order must be one of"):
        next(scc.pp.iter_chunks([path], gs, order="random"))
    with pytest.raises(InputError, match=r"files\[0\]: expected a path"):
        scc.pp.scan([42])
    with pytest.raises(InputError, match="files: the list of inputs is empty"):
        scc.pp.scan([])


def test_file_disappearing_mid_stream(tmp_path, good):
    a, path = good
    second = _write(tmp_path, a, "second.h5ad")
    gs = scc.pp.fit_gene_space([path], n_top_genes=10)
    it = scc.pp.iter_chunks([path, second], gs, chunk_size=50, prefetch=0)
    next(it)
    second.unlink()
    with pytest.raises(InputError, match=r"second\.h5ad: file no longer exists"):
        next(it)


def test_log_normalized_input_warns_naming_the_file(tmp_path, good):
    import scanpy as sc

    a, path = good
    lognorm = a.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    lp = _write(tmp_path, lognorm, "lognorm.h5ad")
    with pytest.warns(scc.NotRawCountsWarning, match=r"lognorm\.h5ad: X holds non-integer values"):
        gs = scc.pp.fit_gene_space([lp], n_top_genes=10)
    with pytest.warns(scc.NotRawCountsWarning, match=r"lognorm\.h5ad"):
        next(scc.pp.iter_chunks([lp], gs))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", scc.NotRawCountsWarning)
        scc.pp.fit_gene_space([path], n_top_genes=10)  # integer counts: no warning


def _three_class_files(tmp_path, rng, n_files=3):
    paths = []
    for i in range(n_files):
        a = random_counts(rng, 120, [f"g{j}" for j in range(40)])
        a.obs_names = [f"f{i}_{n}" for n in a.obs_names]
        paths.append(_write(tmp_path, a, f"part{i}.h5ad"))
    return paths


def test_stream_train_bad_inputs_before_training(tmp_path, rng):
    paths = _three_class_files(tmp_path, rng)
    kw = dict(chunk_size=100, buffer_size=20, epochs_per_step=1, n_top_genes=20, progress=False)
    with pytest.raises(InputError, match=r"part0\.h5ad: obs has no column 'cell_type'"):
        scc.tl.stream_train(paths, "cell_type", **kw)
    with pytest.raises(InputError, match=r"part0\.h5ad: obs\['label'\] holds labels not in the given label set"):
        scc.tl.stream_train(paths, "label", classes=["a", "b"], **kw)
    with pytest.raises(InputError, match="chunk_size must be positive"):
        scc.tl.stream_train(paths, "label", **{**kw, "chunk_size": -5})
    with pytest.raises(InputError, match="max_chunk_fraction must be in"):
        scc.tl.stream_train(paths, "label", max_chunk_fraction=1.5, **kw)


def test_bad_values_mid_stream_write_nothing_half_way(tmp_path, rng):
    paths = _three_class_files(tmp_path, rng)
    kw = dict(chunk_size=100, buffer_size=20, epochs_per_step=1, progress=False)
    gs = scc.pp.fit_gene_space(paths, n_top_genes=20)
    bad = ad.read_h5ad(paths[2])
    X = bad.X.toarray()
    X[5, 0] = np.nan
    bad.X = sp.csr_matrix(X)
    bad.write_h5ad(paths[2])  # broken after the gene space was fitted: found when the stream reaches it
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InputError, match=r"part2\.h5ad: X holds negative or non-finite.*row 5"):
        scc.tl.stream_train(paths, "label", gene_space=gs, checkpoint_dir=ckpt, **kw)
    from sccoreset.tl._checkpoint import read_checkpoint

    saved = read_checkpoint(ckpt)  # the last complete step survives, nothing else was written
    assert saved["engine"]["step"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["sccoreset_checkpoint.pt"]


# -- issue 8: the catalogue's newer rows ----------------------------------------------------------------------


def test_backed_view_of_genes_is_refused_a_view_of_cells_is_read(good):
    a, path = good
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(InputError, match=r"good\.h5ad: is a view that subsets genes \(var: 10 of 40\)"):
            scc.pp.scan([backed[:, :10]])
        view = backed[5:25]  # a view of cells: only those rows are streamed
        assert scc.pp.scan([view]).n_obs == [20]
        gs = scc.pp.fit_gene_space([path], n_top_genes=10)
        chunks = list(scc.pp.iter_chunks([view], gs, label_key="label", chunk_size=100))
        assert np.concatenate([c.obs_names for c in chunks]).tolist() == a.obs_names[5:25].tolist()
    finally:
        backed.file.close()


@pytest.fixture
def unlabelled(tmp_path, good):
    a, _ = good
    m = a.copy()
    labels = m.obs["label"].astype(object)
    labels.iloc[[3, 9]] = np.nan
    m.obs["label"] = pd.Categorical(labels)
    return _write(tmp_path, m, "nolabel.h5ad")


def test_missing_labels_error_or_counted_skip(tmp_path, good, unlabelled):
    from sccoreset._io._labels import MissingLabelsWarning

    assert scc.MissingLabelsWarning is MissingLabelsWarning
    kw = dict(chunk_size=30, buffer_size=10, epochs_per_step=1, final_epochs=0, hidden=(8,), n_top_genes=10)
    with pytest.raises(
        InputError, match=r"nolabel\.h5ad: obs\['label'\] is missing \(NaN/None\) for 2 cells, first in row 3"
    ):
        scc.tl.stream_train([unlabelled], "label", missing_labels="error", progress=False, **kw)
    with pytest.warns(scc.MissingLabelsWarning, match=r"2 cells with a missing label .*nolabel\.h5ad: 2\)"):
        coreset = scc.tl.stream_train([unlabelled], "label", progress=False, **kw)
    assert coreset.obs["label"].notna().all()
    gs = scc.pp.fit_gene_space([good[1]], n_top_genes=10)
    with pytest.warns(scc.MissingLabelsWarning, match=r"2 cells with a missing label .*nolabel\.h5ad: 2\)"):
        chunks = list(scc.pp.iter_chunks([unlabelled], gs, label_key="label"))
    assert sum(len(c) for c in chunks) == 48  # the two unlabelled cells are left out, not made a class
    assert {str(v) for c in chunks for v in c.labels} <= {"a", "b", "c"}


def _damage(tmp_path, good, name, edit):
    import h5py

    path = _write(tmp_path, good[0], name)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def test_indices_out_of_range_and_decreasing_indptr(tmp_path, good):
    def big_index(f):
        f["X/indices"][0] = 1_000_000

    def decreasing(f):
        f["X/indptr"][5] = 0  # row 4 ends before it starts

    gs = scc.pp.fit_gene_space([good[1]], n_top_genes=10)
    for name, edit, msg in [
        ("badidx.h5ad", big_index, r"badidx\.h5ad: X/indices out of range .*first in row 0; the file is corrupt"),
        ("badptr.h5ad", decreasing, r"badptr\.h5ad: X/indptr is decreasing .*at row 4; the file is corrupt"),
    ]:
        path = _damage(tmp_path, good, name, edit)
        with pytest.raises(InputError, match=msg):
            scc.pp.fit_gene_space([path], n_top_genes=10)
        with pytest.raises(InputError, match=msg):
            list(scc.pp.iter_chunks([path], gs, chunk_size=20))


def test_layer_that_does_not_exist(good):
    a, path = good
    with pytest.raises(InputError, match=r"good\.h5ad: has no layer 'raw' \(layers: none\)"):
        scc.pp.scan([path], layer="raw")
    with pytest.raises(InputError, match=r"AnnData #0: has no layer 'raw'"):
        scc.pp.scan([a], layer="raw")


def test_zarr_path_that_is_a_file_or_not_a_store(tmp_path):
    file = tmp_path / "file.zarr"
    file.write_text("not a store")
    with pytest.raises(InputError, match=r"file\.zarr: a \.zarr store should be a directory; this is a file"):
        scc.pp.scan([file])
    folder = tmp_path / "folder.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a store")
    with pytest.raises(InputError, match=r"folder\.zarr: is a directory but cannot be opened as a zarr store"):
        scc.pp.scan([folder])


def test_unknown_option_name_suggests_the_right_one(good):
    with pytest.raises(InputError, match=r"unknown option 'bufer_size' \(did you mean 'buffer_size'\?\)"):
        scc.tl.stream_train([good[1]], "label", bufer_size=10)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("min_per_class", -1, "min_per_class must be at least 0, got -1."),
        ("final_epochs", -1, "final_epochs must be at least 0, got -1."),
        ("distill", -0.5, "distill must be >= 0.0, got -0.5."),
        ("score_decay", -1.0, "score_decay must be >= 0.0, got -1.0."),
        ("block_size", 0, "block_size must be positive, got 0."),
        ("chunk_size", 10.5, "chunk_size must be an integer, got 10.5."),
        ("epochs_per_step", True, "epochs_per_step must be an integer, got True."),
        ("max_chunk_fraction", 0, "max_chunk_fraction must be in (0.0, 1.0], got 0."),
        ("drop_hard", 1, "drop_hard must be in [0.0, 1.0), got 1."),
        ("hidden", (0,), "hidden must be a tuple of positive ints, got (0,)."),
        ("hidden", 5, "hidden must be a tuple of positive ints (() for a linear model), got 5."),
        ("checkpoint_dir", 5, "checkpoint_dir must be a path, got 5."),
        ("random_state", -1, "random_state must be a non-negative int, got -1."),
        ("device", "tpu", "device must be 'cuda', 'cuda:N', 'mps' or 'cpu', got 'tpu'."),
        ("n_workers", 0, "n_workers must be positive, got 0."),
        ("random_state", "abc", "random_state must be an int, a numpy Generator or None, got 'abc'."),
        ("missing_labels", "drop", "missing_labels must be one of ('skip', 'error'), got 'drop'."),
        ("key_added", "", "key_added must be a non-empty string, got ''."),
    ],
)
def test_bad_option_values_name_the_option(good, option, value, message):
    with pytest.raises(InputError) as err:
        scc.tl.stream_train([good[1]], "label", **{option: value})
    assert str(err.value) == message


def test_resume_with_another_number_of_ranks(tmp_path):
    from sccoreset.tl._checkpoint import check_same_run

    saved = {"params": {"buffer_size": "60", "world_size": "2"}, "files": []}
    with pytest.raises(
        InputError, match=r"resume: .*ckpt was made with different parameters: world_size \(checkpoint 2, now 1\)"
    ):
        check_same_run(saved, {"buffer_size": "60", "world_size": "1"}, [], tmp_path / "ckpt")


def test_checkpoint_of_an_older_schema_or_not_a_torch_file(tmp_path, good):
    import torch

    from sccoreset.tl._checkpoint import CHECKPOINT_NAME, read_checkpoint

    old, junk = tmp_path / "old", tmp_path / "junk"
    old.mkdir()
    junk.mkdir()
    torch.save({"schema_version": 1}, old / CHECKPOINT_NAME)
    (junk / CHECKPOINT_NAME).write_bytes(b"this is not a torch checkpoint\n" * 8)
    with pytest.raises(InputError, match=r"old/sccoreset_checkpoint\.pt: checkpoint schema 1 is not \d+"):
        read_checkpoint(old)
    with pytest.raises(InputError, match=r"junk/sccoreset_checkpoint\.pt: not a readable sccoreset checkpoint"):
        read_checkpoint(junk)
    kw = dict(chunk_size=30, buffer_size=10, progress=False)  # the same through stream_train(resume=True)
    with pytest.raises(InputError, match=r"old/sccoreset_checkpoint\.pt: checkpoint schema 1"):
        scc.tl.stream_train([good[1]], "label", checkpoint_dir=old, resume=True, **kw)


@pytest.fixture(scope="module")
def tiny_coreset(small_stream):
    kw = dict(chunk_size=300, buffer_size=60, epochs_per_step=1, final_epochs=0, hidden=(16,), n_top_genes=50)
    return scc.tl.stream_train(small_stream.files, small_stream.label_key, progress=False, **kw)


def test_predict_bad_inputs(tiny_coreset, small_stream, rng):
    other = random_counts(rng, 30, [f"ENSG{i}" for i in range(40)])
    with pytest.raises(InputError, match=r"adata: none of its 40 genes is in the gene list \(50 genes"):
        scc.tl.predict(other, tiny_coreset)
    query = ad.read_h5ad(small_stream.files[0])[:30].copy()
    with pytest.raises(InputError, match=r"majority_voting=True needs over_clustering="):
        scc.tl.predict(query, tiny_coreset, majority_voting=True)
    with pytest.raises(InputError, match=r"over_clustering='leiden' is not a column of adata\.obs"):
        scc.tl.predict(query, tiny_coreset, majority_voting=True, over_clustering="leiden")
    with pytest.raises(InputError, match=r"layer 'raw' not in adata\.layers"):
        scc.tl.predict(query, tiny_coreset, layer="raw")
