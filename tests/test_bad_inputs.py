"""Every bad input gets an InputError naming the file, column or parameter, before any work is done."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
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
