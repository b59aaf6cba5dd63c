from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset import InputError

from .conftest import random_counts


def _concat(files):
    adatas = [ad.read_h5ad(f) for f in files]
    return ad.concat(adatas, join="outer", fill_value=0)


def test_statistics_match_scanpy_on_concatenation(small_stream):
    gs = scc.pp.fit_gene_space(small_stream.files, n_top_genes=100)
    full = _concat(small_stream.files)
    sc.pp.normalize_total(full, target_sum=1e4)
    sc.pp.log1p(full)
    ref = sc.pp.highly_variable_genes(full, n_top_genes=100, flavor="seurat", inplace=False)
    ref_genes = set(ref.index[ref["highly_variable"]])
    overlap = len(ref_genes & set(gs.genes)) / 100
    assert overlap >= 0.95, overlap
    sub = full[:, list(gs.genes)].X.toarray().astype(np.float64)
    np.testing.assert_allclose(gs.mean, sub.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gs.std, sub.std(0, ddof=1), rtol=1e-4, atol=1e-6)
    assert gs.n_cells == full.n_obs


def test_transform_equals_scanpy_pipeline(small_stream, small_gene_space):
    gs = small_gene_space
    a = ad.read_h5ad(small_stream.files[1])  # genes missing and shuffled
    ours = gs.transform(a.X, a.var_names)

    ref = a.copy()
    sc.pp.normalize_total(ref, target_sum=gs.target_sum)
    sc.pp.log1p(ref)
    # genes missing from the file are zeros before scaling
    dense = pd.DataFrame(ref.X.toarray(), columns=ref.var_names).reindex(columns=gs.genes, fill_value=0.0)
    sub = ad.AnnData(dense.to_numpy(np.float32))
    expected = np.clip((sub.X - gs.mean) / np.where(gs.std > 0, gs.std, 1), -gs.max_value, gs.max_value)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert not set(gs.genes) <= set(a.var_names), "fixture should miss genes of the list"


def test_gene_list_computes_statistics_only(small_stream):
    genes = ["GENE00010", "GENE00003", "GENE00200"]
    gs = scc.pp.fit_gene_space(small_stream.files, gene_list=genes)
    assert list(gs.genes) == genes
    assert np.isnan(gs.dispersions_norm).all()
    with pytest.raises(InputError, match="gene_list"):
        scc.pp.fit_gene_space(small_stream.files, gene_list=["NOT_A_GENE"])


def test_max_cells_subsample_is_seeded(small_stream):
    a = scc.pp.fit_gene_space(small_stream.files, n_top_genes=50, max_cells=400, random_state=3)
    b = scc.pp.fit_gene_space(small_stream.files, n_top_genes=50, max_cells=400, random_state=3)
    full = scc.pp.fit_gene_space(small_stream.files, n_top_genes=50)
    assert 400 <= a.n_cells < full.n_cells
    np.testing.assert_array_equal(a.mean, b.mean)
    assert len(set(a.genes) & set(full.genes)) >= 30


def test_dict_round_trip_through_h5ad(tmp_path, small_gene_space):
    adata = ad.AnnData(np.zeros((2, 2), np.float32))
    adata.uns["gs"] = small_gene_space.to_dict()
    adata.write_h5ad(tmp_path / "x.h5ad")
    back = scc.pp.GeneSpace.from_dict(ad.read_h5ad(tmp_path / "x.h5ad").uns["gs"])
    assert list(back.genes) == list(small_gene_space.genes)
    np.testing.assert_array_equal(back.mean, small_gene_space.mean)
    np.testing.assert_array_equal(back.std, small_gene_space.std)
    assert back.target_sum == small_gene_space.target_sum
    assert back.max_value == small_gene_space.max_value


def test_pp_transform_returns_anndata_on_gene_list(small_stream, small_gene_space):
    a = ad.read_h5ad(small_stream.files[1])
    out = scc.pp.transform(a, small_gene_space)
    assert list(out.var_names) == list(small_gene_space.genes)
    assert out.obs.equals(a.obs)
    np.testing.assert_array_equal(out.X, small_gene_space.transform(a.X, a.var_names))
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0
    np.testing.assert_array_equal(scc.pp.transform(a, small_gene_space, layer="counts").X, out.X)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), keep_fraction=st.floats(0.3, 1.0))
def test_alignment_is_by_name(seed, keep_fraction):
    """Any permutation and subset of a cell's genes gives the features of the same cells with those genes zeroed."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(30)]
    a = random_counts(rng, 12, genes, density=0.5)
    gs = scc.pp.GeneSpace(genes=np.array(genes[::2]), mean=rng.random(15), std=rng.random(15) + 0.5, max_value=3.0)
    keep = rng.random(30) < keep_fraction
    keep[0] = True
    cols = rng.permutation(np.flatnonzero(keep))
    shuffled = gs.transform(a.X[:, cols], [genes[c] for c in cols])
    # reference: same cells, genes outside `cols` removed before normalization, original order
    ref_counts = a.X.toarray().copy()
    ref_counts[:, ~keep] = 0
    np.testing.assert_allclose(shuffled, gs.transform(sp.csr_matrix(ref_counts), genes), rtol=1e-6, atol=1e-6)


def test_transform_errors_name_the_problem():
    gs = scc.pp.GeneSpace(genes=np.array(["a", "b"]), mean=np.zeros(2), std=np.ones(2))
    with pytest.raises(InputError, match="none of its 2 genes"):
        gs.transform(np.ones((2, 2)), ["x", "y"], source="my.h5ad")
    with pytest.raises(InputError, match=r"my\.h5ad: duplicate gene"):
        gs.transform(np.ones((2, 2)), ["a", "a"], source="my.h5ad")
    with pytest.raises(InputError, match=r"negative or non-finite.*row 1"):
        gs.transform(np.array([[1.0, 2.0], [np.nan, 1.0]]), ["a", "b"])
    with pytest.raises(InputError, match="negative or non-finite"):
        gs.transform(np.array([[1.0, -2.0]]), ["a", "b"])
    with pytest.raises(InputError, match="negative or non-finite"):
        gs.transform(np.array([[1.0, np.inf]]), ["a", "b"])


def test_zero_count_cell_gets_the_zero_features():
    gs = scc.pp.GeneSpace(genes=np.array(["a", "b"]), mean=np.array([1.0, 2.0]), std=np.array([0.5, 0.0]))
    out = gs.transform(np.zeros((1, 2)), ["a", "b"])
    np.testing.assert_allclose(out, [[-2.0, -2.0]])  # std 0 scales by 1, as scanpy does
