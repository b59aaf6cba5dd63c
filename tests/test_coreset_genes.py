"""`genes="all"`: the coreset's X holds the kept cells' raw counts on every gene of the files."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sccoreset as scc
from sccoreset._utils import h5ad_safe_strings
from sccoreset.tl._coreset import MissingGenesWarning

KW = dict(chunk_size=250, buffer_size=60, epochs_per_step=2, hidden=(32,), final_epochs=1, progress=False, device="cpu")
MKW = dict(
    chunk_size=100, buffer_size=60, epochs_per_step=2, hidden=(16,), final_epochs=1, progress=False, device="cpu"
)
BASE = [f"G{i:03d}" for i in range(40)]
GENE_LIST = BASE[:20]


def _run(*args, **kwargs) -> tuple[ad.AnnData, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs = scc.tl.stream_train(*args, **kwargs)
    return cs, [w for w in caught if issubclass(w.category, MissingGenesWarning)]


@pytest.fixture(scope="module")
def runs(small_stream, small_gene_space):
    """The same run (same seed, CPU) with genes='list' and genes='all'."""
    files = small_stream.files
    listed, w_list = _run(files, "cell_type", gene_space=small_gene_space, **KW)
    every, w_all = _run(files, "cell_type", gene_space=small_gene_space, genes="all", **KW)
    assert not w_list
    return listed, every, w_all


def _marker_file(rng: np.random.Generator, n: int, genes: list[str]) -> ad.AnnData:
    """Poisson counts; gene ``MK`` is high in class ``b`` only; ``layers["raw"]`` is 3 × X."""
    labels = rng.choice(["a", "b", "c"], n)
    X = rng.poisson(3.0, (n, len(genes))).astype(np.float32)
    if "MK" in genes:
        X[:, genes.index("MK")] = rng.poisson(np.where(labels == "b", 40.0, 0.5))
    listed = [genes.index(g) for g in GENE_LIST[:3] if g in genes]  # something on the list for the model
    X[np.ix_(labels == "c", listed)] += 6
    obs = pd.DataFrame({"label": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(n)])
    return ad.AnnData(
        X=sp.csr_matrix(X),
        obs=h5ad_safe_strings(obs),
        var=h5ad_safe_strings(pd.DataFrame(index=genes)),
        layers={"raw": sp.csr_matrix(X * 3)},
    )


@pytest.fixture(scope="module")
def marker_stream(tmp_path_factory):
    """Three inputs with different gene sets; the third one in memory. Union: BASE, MK, ONLY1."""
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("marker_stream")
    genes1 = BASE[:35] + ["MK", "ONLY1"]
    rng.shuffle(genes1)
    a0 = _marker_file(rng, 150, BASE + ["MK"])
    a1 = _marker_file(rng, 150, genes1)
    a2 = _marker_file(rng, 150, ["MK", *BASE[::-1]])
    p0, p1 = d / "m0.h5ad", d / "m1.h5ad"
    a0.write_h5ad(p0)
    a1.write_h5ad(p1)
    return [p0, p1, a2]


@pytest.fixture(scope="module")
def marker_run(marker_stream):
    gs = scc.pp.fit_gene_space(marker_stream, gene_list=GENE_LIST)
    return _run(marker_stream, "label", gene_space=gs, genes="all", **MKW)


def _input_rows(cs: ad.AnnData, inputs: list) -> list[tuple[np.ndarray, ad.AnnData, np.ndarray]]:
    """For each input: the coreset positions of its kept cells, the input read by anndata, their file rows."""
    out = []
    for i, item in enumerate(inputs):
        name = str(item) if not isinstance(item, ad.AnnData) else f"AnnData #{i}"
        sel = np.flatnonzero(cs.obs["sccoreset_file"].astype(str) == name)
        src = ad.read_h5ad(item) if not isinstance(item, ad.AnnData) else item
        out.append((sel, src, cs.obs["sccoreset_row"].to_numpy()[sel]))
    return out


def _expected(src: ad.AnnData, rows: np.ndarray, var_names: pd.Index, layer: str | None = None) -> np.ndarray:
    return src[rows].to_df(layer=layer).reindex(columns=var_names, fill_value=0.0).to_numpy()


def test_X_is_the_files_raw_rows_on_every_gene(runs, small_stream):
    _, cs, _ = runs
    assert sp.issparse(cs.X) and cs.X.format == "csr" and cs.X.dtype == np.float32
    assert "counts" not in cs.layers
    seen = 0
    for sel, src, rows in _input_rows(cs, small_stream.files):
        np.testing.assert_array_equal(cs.X[sel].toarray(), _expected(src, rows, cs.var_names))
        np.testing.assert_array_equal(cs.obs_names[sel], src.obs_names[rows])
        seen += sel.size
    assert seen == cs.n_obs == KW["buffer_size"]


def test_union_of_genes_and_missing_recorded(runs, small_stream, marker_run, marker_stream):
    _, cs, caught = runs
    per_file = [ad.read_h5ad(f, backed="r").var_names for f in small_stream.files]
    union = pd.Index(list(dict.fromkeys(g for names in per_file for g in names)))
    assert list(cs.var_names) == list(union)
    missing = np.asarray(cs.uns["sccoreset"]["genes_missing_per_file"])
    np.testing.assert_array_equal(missing, [len(union) - len(v) for v in per_file])
    assert missing.any() and len(caught) == 1 and "genes_missing_per_file" in str(caught[0].message)
    # known layout: the union in order of first appearance, each input's missing genes counted
    mcs, mcaught = marker_run
    assert list(mcs.var_names) == [*BASE, "MK", "ONLY1"]
    np.testing.assert_array_equal(mcs.uns["sccoreset"]["genes_missing_per_file"], [1, 5, 1])
    np.testing.assert_array_equal(mcs.var["sccoreset_n_files"], [3] * 35 + [2] * 5 + [3, 1])
    assert len(mcaught) == 1
    for sel, src, rows in _input_rows(mcs, marker_stream):
        assert sel.size  # every input has kept cells
        np.testing.assert_array_equal(mcs.X[sel].toarray(), _expected(src, rows, mcs.var_names))
        lacking = ~mcs.var_names.isin(src.var_names)
        assert lacking.any() and mcs.X[sel][:, lacking].nnz == 0


def test_highly_variable_marks_the_gene_list(runs, small_gene_space):
    _, cs, _ = runs
    hv = cs.var["highly_variable"]
    assert hv.dtype == bool
    assert set(cs.var_names[hv.to_numpy()]) == set(small_gene_space.genes)
    on = cs.var.loc[list(small_gene_space.genes)]
    np.testing.assert_array_equal(on["mean"], small_gene_space.mean)
    np.testing.assert_array_equal(on["std"], small_gene_space.std)
    assert cs.var.loc[~hv, ["mean", "std"]].isna().all().all()


def test_features_in_obsm_equal_the_list_run(runs, small_gene_space):
    listed, cs, _ = runs
    feats = cs.obsm["sccoreset_features"]
    assert isinstance(feats, np.ndarray) and feats.dtype == np.float32
    assert feats.shape == (cs.n_obs, small_gene_space.n_genes)
    np.testing.assert_array_equal(feats, listed.X)
    pd.testing.assert_frame_equal(cs.obs, listed.obs)
    # the list run's counts layer is the all-genes X on the gene list
    np.testing.assert_array_equal(cs[:, list(small_gene_space.genes)].X.toarray(), listed.layers["counts"].toarray())
    # genes='list' is unchanged: features in X, counts in a layer, no obsm features
    assert list(listed.var.columns) == ["mean", "std"] and "sccoreset_features" not in listed.obsm


def test_write_read_round_trip(tmp_path, runs):
    _, cs, _ = runs
    path = tmp_path / "all.h5ad"
    cs.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert sp.issparse(back.X)
    np.testing.assert_array_equal(back.X.toarray(), cs.X.toarray())
    np.testing.assert_array_equal(back.obsm["sccoreset_features"], cs.obsm["sccoreset_features"])
    pd.testing.assert_frame_equal(back.var, cs.var)
    np.testing.assert_array_equal(
        back.uns["sccoreset"]["genes_missing_per_file"], cs.uns["sccoreset"]["genes_missing_per_file"]
    )


def test_scanpy_finds_a_marker_off_the_gene_list(marker_run):
    sc = pytest.importorskip("scanpy")
    cs = marker_run[0].copy()
    assert "MK" not in GENE_LIST and not cs.var.loc["MK", "highly_variable"]
    sc.pp.normalize_total(cs)
    sc.pp.log1p(cs)
    sc.tl.rank_genes_groups(cs, "label")
    top_b = sc.get.rank_genes_groups_df(cs, "b")["names"].iloc[0]
    assert top_b == "MK"
    ranked = {sc.get.rank_genes_groups_df(cs, g)["names"].iloc[0] for g in ("a", "b", "c")}
    assert ranked - set(GENE_LIST)


def test_counts_come_from_the_layer(marker_stream):
    gs = scc.pp.fit_gene_space(marker_stream, gene_list=GENE_LIST, layer="raw")
    cs, _ = _run(marker_stream, "label", gene_space=gs, genes="all", layer="raw", **MKW)
    for sel, src, rows in _input_rows(cs, marker_stream):
        np.testing.assert_array_equal(cs.X[sel].toarray(), _expected(src, rows, cs.var_names, layer="raw"))
        np.testing.assert_array_equal(cs.X[sel].toarray(), 3 * _expected(src, rows, cs.var_names))


def test_predict_on_and_with_an_all_genes_coreset(tmp_path, runs, small_stream):
    listed, cs, _ = runs
    # the coreset as data to predict: X is raw counts on every gene, as predict expects of new cells
    with pytest.raises(scc.InputError, match="key_added"):
        scc.tl.predict(cs, cs)
    out = scc.tl.predict(cs, cs, key_added="pred", copy=True)
    net, _, classes = scc.tl.load_classifier(cs)
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(cs.obsm["sccoreset_features"])).numpy()
    np.testing.assert_array_equal(out.obs["pred_prediction"].astype(str), np.asarray(classes)[logits.argmax(1)])
    # the counts on every gene give back exactly the features the model was trained on (library sizes
    # included, which the gene list's counts alone do not give)
    gs = scc.pp.GeneSpace.from_dict(cs.uns["sccoreset"]["gene_space"])
    np.testing.assert_array_equal(gs.transform(cs.X, cs.var_names), cs.obsm["sccoreset_features"])
    # the coreset as the classifier, also read back from disk
    cs.write_h5ad(tmp_path / "all.h5ad")
    hold = ad.read_h5ad(small_stream.holdout)
    a = scc.tl.predict(hold, cs, copy=True)
    b = scc.tl.predict(hold, ad.read_h5ad(tmp_path / "all.h5ad"), copy=True)
    c = scc.tl.predict(hold, listed, copy=True)
    np.testing.assert_array_equal(a.obs["sccoreset_prediction"], c.obs["sccoreset_prediction"])
    np.testing.assert_array_equal(b.obs["sccoreset_prediction"], c.obs["sccoreset_prediction"])


def test_writes_under_pandas_string_inference(tmp_path, marker_stream):
    """pandas 3 infers a string dtype that anndata refuses to write by default: the coreset must still write."""
    if tuple(int(p) for p in pd.__version__.split(".")[:2]) < (2, 3) or not hasattr(
        ad.settings, "allow_write_nullable_strings"
    ):
        pytest.skip("string inference needs pandas >= 2.3 (or pyarrow), and the setting anndata >= 0.11.2")
    with pd.option_context("future.infer_string", True), ad.settings.override(allow_write_nullable_strings=False):
        gs = scc.pp.fit_gene_space(marker_stream, gene_list=GENE_LIST)
        cs, _ = _run(marker_stream, "label", gene_space=gs, genes="all", **MKW)
        cs.write_h5ad(tmp_path / "cs.h5ad")
        back = ad.read_h5ad(tmp_path / "cs.h5ad")
    assert list(back.var_names) == list(cs.var_names) and back.var["highly_variable"].sum() == len(GENE_LIST)


def test_a_genes_all_coreset_predicts_its_own_cells_like_their_files(runs, small_stream):
    """Its X holds the raw counts on every gene: predicting on it equals predicting on the files' rows."""
    _, cs, _ = runs
    out = scc.tl.predict(cs, cs, key_added="self", copy=True)
    for where, src, rows in _input_rows(cs, small_stream.files):
        if not where.size:
            continue
        ref = scc.tl.predict(src[rows].copy(), cs, copy=True)
        np.testing.assert_allclose(
            out.obsm["self_probabilities"].to_numpy()[where], ref.obsm["sccoreset_probabilities"].to_numpy(),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
