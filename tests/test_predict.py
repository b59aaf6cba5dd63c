from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import sccoreset as scc
from sccoreset import InputError

KW = dict(chunk_size=300, buffer_size=60, epochs_per_step=1, final_epochs=1, progress=False)


@pytest.fixture(scope="module")
def coreset(small_stream, small_gene_space):
    return scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, **KW)


@pytest.fixture
def query(small_stream):
    q = ad.read_h5ad(small_stream.holdout)
    # two "clusters" that cut across the true labels, and one cell without a cluster
    clusters = np.where(np.arange(q.n_obs) % 3 == 0, "k0", "k1").astype(object)
    clusters[5] = None
    q.obs["leiden"] = pd.Categorical(clusters)
    return q


def test_outputs(query, coreset):
    scc.tl.predict(query, coreset, device="cpu")
    classes = [str(c) for c in coreset.uns["sccoreset"]["classes"]]
    pred = query.obs["sccoreset_prediction"]
    assert list(pred.cat.categories) == classes
    prob = query.obsm["sccoreset_probabilities"]
    assert isinstance(prob, pd.DataFrame)
    assert list(prob.columns) == classes and prob.index.equals(query.obs_names)
    np.testing.assert_allclose(prob.to_numpy().sum(1), 1, rtol=1e-10)
    np.testing.assert_array_equal(query.obs["sccoreset_confidence"], prob.to_numpy().max(1))
    np.testing.assert_array_equal(pred.astype(str), prob.idxmax(axis=1).astype(str))
    assert "sccoreset_majority_voting" not in query.obs
    params = query.uns["sccoreset"]["params"]
    assert params["device"] == "cpu" and params["layer"] == "None" and params["majority_voting"] is False
    assert list(query.uns["sccoreset"]["classes"]) == classes


def test_majority_voting_constant_within_clusters(query, coreset):
    scc.tl.predict(query, coreset, over_clustering="leiden", majority_voting=True, key_added="ct")
    obs = query.obs
    assert "ct_prediction" in obs and "sccoreset_prediction" not in obs
    for name, group in obs.dropna(subset=["leiden"]).groupby("leiden", observed=True):
        votes = group["ct_majority_voting"].astype(str)
        assert votes.nunique() == 1
        # the most frequent prediction of the cluster
        counts = group["ct_prediction"].value_counts()
        assert counts[votes.iloc[0]] == counts.max(), name
    assert pd.isna(obs["ct_majority_voting"].iloc[5])
    assert query.uns["ct"]["params"]["over_clustering"] == "leiden"
    assert query.uns["ct"]["params"]["majority_voting"] is True


def test_errors(query, coreset):
    with pytest.raises(InputError, match="majority_voting=True needs over_clustering"):
        scc.tl.predict(query, coreset, majority_voting=True)
    with pytest.raises(InputError, match=r"over_clustering='louvain' is not a column of adata\.obs"):
        scc.tl.predict(query, coreset, majority_voting=True, over_clustering="louvain")
    with pytest.raises(InputError, match=r"layer 'nope' not in adata\.layers"):
        scc.tl.predict(query, coreset, layer="nope")
    # the coreset holds training columns under the same prefix: refuse to overwrite them
    with pytest.raises(InputError, match="holds a trained coreset's record"):
        scc.tl.predict(coreset, coreset)
    # a genes='list' coreset's counts cover the gene list only: transforming them again gives other features
    with pytest.raises(InputError, match=r"genes='list'.*layers\['counts'\] holds counts on its \d+ list genes"):
        scc.tl.predict(coreset, coreset, layer="counts", key_added="self", copy=True)
    with pytest.raises(InputError, match=r"genes='list'.*X holds its features, not counts"):
        scc.tl.predict(coreset, coreset, key_added="self", copy=True)
    assert "self_prediction" not in coreset.obs


def test_layer_and_copy(query, coreset):
    ref = scc.tl.predict(query, coreset, copy=True)
    assert "sccoreset_prediction" not in query.obs
    moved = query.copy()
    moved.layers["counts"] = moved.X.copy()
    moved.X = moved.X * 0
    scc.tl.predict(moved, coreset, layer="counts")
    np.testing.assert_allclose(moved.obsm["sccoreset_probabilities"], ref.obsm["sccoreset_probabilities"])
    assert moved.uns["sccoreset"]["params"]["layer"] == "counts"


def test_h5ad_round_trip(query, coreset, tmp_path):
    scc.tl.predict(query, coreset, over_clustering="leiden", majority_voting=True)
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    for col in ["sccoreset_prediction", "sccoreset_confidence", "sccoreset_majority_voting"]:
        pd.testing.assert_series_equal(back.obs[col], query.obs[col], check_categorical=False, check_index_type=False)
    prob = back.obsm["sccoreset_probabilities"]
    assert isinstance(prob, pd.DataFrame)
    np.testing.assert_array_equal(prob.to_numpy(), query.obsm["sccoreset_probabilities"].to_numpy())
    assert list(prob.columns) == list(query.obsm["sccoreset_probabilities"].columns)
    assert back.uns["sccoreset"]["params"]["over_clustering"] == "leiden"
    assert list(back.uns["sccoreset"]["classes"]) == list(query.uns["sccoreset"]["classes"])


def test_empty_query(query, coreset):
    empty = query[:0].copy()
    scc.tl.predict(empty, coreset)
    assert empty.obsm["sccoreset_probabilities"].shape == (0, len(coreset.uns["sccoreset"]["classes"]))


def test_default_device_and_a_model_moved_elsewhere(query, coreset):
    scc.tl.predict(query, coreset)
    expected = "cuda" if torch.cuda.is_available() else query.uns["sccoreset"]["params"]["device"]
    assert query.uns["sccoreset"]["params"]["device"] == expected
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            scc.tl.predict(query, coreset, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(query, coreset):
    cpu = scc.tl.predict(query, coreset, device="cpu", copy=True)
    gpu = scc.tl.predict(query, coreset, device="cuda", copy=True)
    np.testing.assert_allclose(gpu.obsm["sccoreset_probabilities"], cpu.obsm["sccoreset_probabilities"], atol=1e-5)
