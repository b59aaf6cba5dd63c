from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import sccoreset as scc
from sccoreset import InputError

KW = dict(chunk_size=250, buffer_size=60, epochs_per_step=2, hidden=(32,), final_epochs=1, progress=False)


@pytest.fixture(scope="module")
def trained(small_stream, small_gene_space):
    return scc.tl.stream_train(
        small_stream.files, "cell_type", gene_space=small_gene_space, eval_data=small_stream.holdout, **KW
    )


def test_coreset_contract(trained, small_stream, small_gene_space):
    cs = trained
    assert cs.n_obs == KW["buffer_size"]
    assert list(cs.var_names) == list(small_gene_space.genes)
    for col in ("sccoreset_file", "sccoreset_row", "sccoreset_chunk", "sccoreset_step_added", "sccoreset_aum",
                "sccoreset_confidence", "sccoreset_variability", "sccoreset_forgetting", "lineage", "batch"):  # fmt: skip
        assert col in cs.obs
    assert not cs.obs_names.has_duplicates
    keys = set(zip(cs.obs["sccoreset_file"].astype(str), cs.obs["sccoreset_row"], strict=True))
    assert len(keys) == cs.n_obs
    # every kept cell traces back to its file and row: same obs, same features, same counts
    for path in map(str, small_stream.files):
        sel = np.flatnonzero(cs.obs["sccoreset_file"].astype(str) == path)
        if not sel.size:
            continue
        src = ad.read_h5ad(path)
        rows = cs.obs["sccoreset_row"].to_numpy()[sel]
        np.testing.assert_array_equal(cs.obs_names[sel], src.obs_names[rows])
        np.testing.assert_array_equal(
            cs.obs["cell_type"].astype(str).to_numpy()[sel], src.obs["cell_type"].astype(str).to_numpy()[rows]
        )
        np.testing.assert_array_equal(cs.X[sel], small_gene_space.transform(src.X[rows], src.var_names))
        expected = src[rows].to_df().reindex(columns=cs.var_names, fill_value=0.0).to_numpy()
        np.testing.assert_array_equal(cs.layers["counts"][sel].toarray(), expected)
    rec = cs.uns["sccoreset"]
    assert list(rec["classes"]) == sorted(set(ad.read_h5ad(small_stream.holdout).obs["cell_type"].astype(str)))
    hist = rec["history"]
    n_steps = int(np.ceil(sum(ad.read_h5ad(f, backed="r").n_obs for f in small_stream.files) / KW["chunk_size"]))
    assert hist["macro_f1"].shape == (n_steps,)
    assert hist["f1"].shape == (n_steps, len(rec["classes"]))
    assert (hist["buffer_class_counts"].sum(1) == KW["buffer_size"]).all()
    assert (hist["buffer_chunk_counts"].sum(1) == KW["buffer_size"]).all()
    assert (hist["wait_seconds"] >= 0).all()
    assert 0 <= hist["final"]["macro_f1"] <= 1


def test_late_type_is_learned_and_output_size_fixed(trained, small_stream):
    classes = list(trained.uns["sccoreset"]["classes"])
    assert small_stream.late_type in classes
    late = classes.index(small_stream.late_type)
    counts = trained.uns["sccoreset"]["history"]["buffer_class_counts"]
    assert counts[0, late] == 0 and counts[-1, late] > 0


def test_write_read_predict_round_trip(tmp_path, trained, small_stream):
    path = tmp_path / "coreset.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    hold = ad.read_h5ad(small_stream.holdout)
    a = scc.tl.predict(hold, trained, copy=True)
    b = scc.tl.predict(hold, back, copy=True)
    np.testing.assert_array_equal(a.obs["sccoreset_prediction"], b.obs["sccoreset_prediction"])
    np.testing.assert_allclose(a.obs["sccoreset_confidence"], b.obs["sccoreset_confidence"])
    assert "sccoreset_prediction" not in hold.obs
    assert scc.tl.predict(hold, back) is None
    # predictions from the stored model and gene space match the evaluation made during training
    acc = (hold.obs["sccoreset_prediction"].astype(str) == hold.obs["cell_type"].astype(str)).mean()
    assert acc == pytest.approx(back.uns["sccoreset"]["history"]["final"]["accuracy"])
    assert set(hold.obs["sccoreset_prediction"].cat.categories) == set(back.uns["sccoreset"]["classes"])


def test_same_seed_same_coreset(small_stream, small_gene_space):
    runs = [
        scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, random_state=s, **KW)
        for s in (3, 3, 4)
    ]
    assert list(runs[0].obs_names) == list(runs[1].obs_names)
    np.testing.assert_array_equal(runs[0].X, runs[1].X)
    np.testing.assert_array_equal(
        runs[0].uns["sccoreset"]["history"]["train_loss"], runs[1].uns["sccoreset"]["history"]["train_loss"]
    )
    assert list(runs[0].obs_names) != list(runs[2].obs_names)


@pytest.mark.parametrize("rule", ["top", "weighted", "forgetting", "random"])
def test_every_rule_and_block_shuffle_run(small_stream, small_gene_space, rule):
    cs = scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, rule=rule,
                             order="block_shuffle", class_budget="proportional", **KW)  # fmt: skip
    assert cs.n_obs == KW["buffer_size"] and not cs.obs_names.has_duplicates


def test_custom_model_and_errors(small_stream, small_gene_space):
    files = small_stream.files
    n_classes = len(scc.pp.scan(files, "cell_type").labels)
    model = torch.nn.Sequential(torch.nn.Linear(small_gene_space.n_genes, n_classes))
    cs = scc.tl.stream_train(files, "cell_type", gene_space=small_gene_space, model=model, **KW)
    with pytest.raises(ValueError, match="custom model"):
        scc.tl.predict(ad.read_h5ad(small_stream.holdout), cs)
    scc.tl.predict(
        ad.read_h5ad(small_stream.holdout),
        cs,
        model=torch.nn.Sequential(torch.nn.Linear(small_gene_space.n_genes, n_classes)),
    )

    def call(**kw):
        return scc.tl.stream_train(files, "cell_type", gene_space=small_gene_space, **{**KW, **kw})

    with pytest.raises(InputError, match=r"model: outputs shape \(3,\) per cell, but there are"):
        call(model=torch.nn.Linear(small_gene_space.n_genes, 3))
    with pytest.raises(InputError, match=r"model: cannot map 100 features"):
        call(model=torch.nn.Linear(7, n_classes))
    with pytest.raises(InputError, match=r"buffer_size \(300\) must be smaller than chunk_size \(250\)"):
        call(buffer_size=300)
    with pytest.raises(InputError, match="epochs_per_step must be positive"):
        call(epochs_per_step=0)
    with pytest.raises(InputError, match="times min_per_class"):
        call(min_per_class=10)
    with pytest.raises(InputError, match="rule must be one of"):
        call(rule="hardest")
    with pytest.raises(InputError, match=r"holds labels not in the given label set"):
        call(classes=["B-1", "B-2"])
    hold = ad.read_h5ad(small_stream.holdout)
    hold.obs["cell_type"] = hold.obs["cell_type"].astype(str).replace({"B-1": "Plasma"})
    with pytest.raises(
        InputError, match=r"eval_data: obs\['cell_type'\] holds labels the training stream does not have: \['Plasma'\]"
    ):
        call(eval_data=hold)
    with pytest.raises(InputError, match="none of its"):
        call(eval_data=ad.AnnData(hold.X, obs=hold.obs, var=hold.var.set_index(hold.var_names + "_x")))


def test_fits_the_gene_space_when_none_is_given(small_stream):
    cs = scc.tl.stream_train(small_stream.files, "cell_type", n_top_genes=80, **KW)
    expected = scc.pp.fit_gene_space(small_stream.files, n_top_genes=80)
    assert list(cs.var_names) == list(expected.genes)
    np.testing.assert_allclose(cs.var["mean"], expected.mean)


def test_coreset_writes_under_pandas_string_inference(tmp_path):
    """pandas 3 infers a string dtype that anndata refuses to write by default: the coreset must still write."""
    import pandas as pd

    if tuple(int(p) for p in pd.__version__.split(".")[:2]) < (2, 3) or not hasattr(
        ad.settings, "allow_write_nullable_strings"
    ):
        pytest.skip("string inference needs pandas >= 2.3 (or pyarrow), and the setting anndata >= 0.11.2")
    with pd.option_context("future.infer_string", True), ad.settings.override(allow_write_nullable_strings=False):
        d = tmp_path / "stream"
        stream = scc.datasets.synthetic_stream(d, n_files=2, cells_per_file=300, n_genes=300, holdout_per_type=5)
        cs = scc.tl.stream_train(stream.files, "cell_type", **{**KW, "n_top_genes": 50})
        cs.write_h5ad(tmp_path / "cs.h5ad")
        assert list(ad.read_h5ad(tmp_path / "cs.h5ad").obs_names) == list(cs.obs_names)


def test_cpu_training_reads_between_steps_by_default_and_reading_ahead_changes_nothing(small_stream, small_gene_space):
    """On a CPU no reading thread runs beside training (they compete for the cores); prefetch=1 brings them back."""
    import threading

    def readers_alive_during_steps(**kw):
        before = set(threading.enumerate())  # threads of earlier tests do not count
        alive = []
        for _ in scc.tl.stream_events(small_stream.files, "cell_type", gene_space=small_gene_space, device="cpu",
                                      **KW, **kw):  # fmt: skip
            alive.append(any(t.name.startswith("sccoreset-") for t in set(threading.enumerate()) - before))
        return alive

    assert not any(readers_alive_during_steps())
    assert any(readers_alive_during_steps(prefetch=1))
    runs = [
        scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, device="cpu", **KW, **kw)
        for kw in ({}, {"prefetch": 1}, {"prefetch": 2, "n_workers": 1})
    ]
    assert [r.uns["sccoreset"]["params"]["prefetch"] for r in runs] == [0, 1, 2]  # what was used, not None
    for other in runs[1:]:
        assert list(other.obs_names) == list(runs[0].obs_names)
        np.testing.assert_array_equal(other.X, runs[0].X)
    with pytest.raises(InputError, match="prefetch"):
        scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, prefetch=-1, **KW)
