"""Multi-task training: several label keys, one head each; budgets over a key or a combination of keys."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sccoreset as scc
from sccoreset._errors import InputError

FAST = dict(chunk_size=300, buffer_size=60, epochs_per_step=2, final_epochs=1, progress=False, n_top_genes=100)


@pytest.fixture(scope="module")
def two_task_stream(small_stream):
    """The small stream's files and holdout: obs holds a second task, the lineage of each cell type."""
    return small_stream.files, small_stream.holdout


def test_two_tasks_train_predict_and_record(two_task_stream):
    files, holdout = two_task_stream
    keys = ["cell_type", "lineage"]
    coreset = scc.tl.stream_train(files, keys, eval_data=holdout, **FAST)
    rec = coreset.uns["sccoreset"]
    assert list(rec["label_keys"]) == keys
    n_types, n_lineages = len(rec["tasks"]["cell_type"]), len(rec["tasks"]["lineage"])
    # one head per task: the model's last layer outputs both tasks' logits
    last = [v for k, v in rec["model"]["weights"].items() if k.endswith("weight")][-1]
    assert last.shape[0] == n_types + n_lineages
    # each kept cell's labels are its own labels in the files, for both tasks
    truth = pd.concat([ad.read_h5ad(f).obs for f in files])
    names = coreset.obs["sccoreset_obs_name"] if "sccoreset_obs_name" in coreset.obs else coreset.obs_names
    for key in keys:
        assert list(coreset.obs[key].astype(str)) == [str(truth.loc[n, key]) for n in names]
    # budget over the first key: cell types balanced, weights give back the stream's cell-type counts
    counts = truth["cell_type"].value_counts()
    weighted = coreset.obs.groupby("cell_type", observed=True)["sccoreset_weight"].sum()
    np.testing.assert_allclose(weighted.reindex(counts.index).to_numpy(), counts.to_numpy())
    # per-task metrics in the history, every task's F1 trajectory as wide as its classes
    hist = rec["history"]
    assert set(hist["tasks"]) == set(keys)
    assert hist["tasks"]["cell_type"]["f1"].shape[1] == n_types
    assert hist["tasks"]["lineage"]["f1"].shape[1] == n_lineages
    np.testing.assert_allclose(hist["tasks"]["cell_type"]["macro_f1"], hist["macro_f1"])
    assert hist["tasks"]["lineage"]["macro_f1"][-1] > 0.6  # the coarse task is easy
    # predictions: one set of columns per task, on the coreset's own label sets
    query = ad.read_h5ad(holdout)
    scc.tl.predict(query, coreset, key_added="pred")
    for key in keys:
        assert list(query.obs[f"pred_{key}_prediction"].cat.categories) == list(rec["tasks"][key])
        assert query.obsm[f"pred_{key}_probabilities"].shape == (query.n_obs, len(rec["tasks"][key]))
    acc = (query.obs["pred_lineage_prediction"].astype(str) == query.obs["lineage"].astype(str)).mean()
    assert acc > 0.6
    # plots per task
    ax = scc.pl.f1_trajectories(coreset, task="lineage", show=False)
    assert len(ax.get_lines()) == n_lineages + 2
    np.testing.assert_allclose(ax.get_lines()[-2].get_ydata(), hist["tasks"]["lineage"]["macro_f1"])
    scc.pl.chunk_distribution(coreset, kind="final", task="lineage", show=False)
    with pytest.raises(InputError, match="not a label key"):
        scc.pl.f1_trajectories(coreset, task="donor", show=False)


def test_budget_over_a_combination_of_keys(two_task_stream, tmp_path):
    files, _ = two_task_stream
    coreset = scc.tl.stream_train(files, ["lineage", "cell_type"], budget_key=["lineage", "cell_type"], **FAST)
    # budget classes are the (lineage, type) combinations; weights still recover every combination's count
    truth = pd.concat([ad.read_h5ad(f).obs for f in files])
    combo = truth["lineage"].astype(str) + " | " + truth["cell_type"].astype(str)
    kept = coreset.obs["sccoreset_budget_class"].astype(str)
    weighted = coreset.obs["sccoreset_weight"].groupby(kept.to_numpy()).sum()
    expected = combo.value_counts()
    np.testing.assert_allclose(weighted.reindex(expected.index).to_numpy(), expected.to_numpy())
    coreset.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    assert list(back.uns["sccoreset"]["budget"]["keys"]) == ["lineage", "cell_type"]


def test_linear_heads_and_given_classes(two_task_stream):
    files, _ = two_task_stream
    lineages = sorted(set(pd.concat([ad.read_h5ad(f).obs for f in files])["lineage"].astype(str))) + ["Unseen"]
    coreset = scc.tl.stream_train(files, ["cell_type", "lineage"], hidden=(), classes={"lineage": lineages}, **FAST)
    assert list(coreset.uns["sccoreset"]["tasks"]["lineage"]) == lineages
    weights = coreset.uns["sccoreset"]["model"]["weights"]
    # hidden=(): one linear layer, whose rows are the heads of both tasks
    (w,) = [v for k, v in weights.items() if k.endswith("weight")]
    assert w.shape[0] == len(coreset.uns["sccoreset"]["tasks"]["cell_type"]) + len(lineages)


def test_multitask_errors(two_task_stream):
    files, _ = two_task_stream
    with pytest.raises(InputError, match="budget_key"):
        scc.tl.stream_train(files, ["cell_type", "lineage"], budget_key="donor", **FAST)
    with pytest.raises(InputError, match="twice"):
        scc.tl.stream_train(files, ["cell_type", "cell_type"], **FAST)
    with pytest.raises(InputError, match="dict"):
        scc.tl.stream_train(files, ["cell_type", "lineage"], classes=["a", "b"], **FAST)
    model = torch.nn.Linear(100, 3)
    with pytest.raises(InputError, match="over all tasks"):
        scc.tl.stream_train(files, ["cell_type", "lineage"], model=model, **FAST)


def test_validation_augmenter_scores_each_task_on_its_own_head(two_task_stream):
    files, holdout = two_task_stream
    gs = scc.pp.fit_gene_space(files, n_top_genes=100)
    h = ad.read_h5ad(holdout)
    X = gs.transform(h.X, h.var_names, source="holdout")
    kw = {k: v for k, v in FAST.items() if k != "n_top_genes"}
    with scc.tl.stream_events(files, ["cell_type", "lineage"], gene_space=gs, eval_data=holdout, **kw) as ev:
        lineages = pd.Index(ev.run.tasks[1])
        types = pd.Index(ev.run.tasks[0])
        y_lin = lineages.get_indexer(h.obs["lineage"].astype(str))
        both = np.stack([types.get_indexer(h.obs["cell_type"].astype(str)), y_lin], 1)
        stages = [
            scc.stream.augment(scc.stream.validation(X, y_lin, task="lineage", prefix="lin_")),
            scc.stream.augment(scc.stream.validation(X, both)),
            scc.stream.take(2),
        ]
        events = scc.stream.collect(scc.stream.pipe(ev, *stages))
        model = ev.model
    for e in events:
        # the same figures as the run's own evaluation, task by task
        assert e["lin_macro_f1"] == pytest.approx(e["task_metrics"][1]["macro_f1"])
        assert len(e["lin_f1"]) == len(lineages)
        assert e["val_macro_f1"] == pytest.approx(e["task_metrics"][0]["macro_f1"])
        assert e["val_lineage_macro_f1"] == pytest.approx(e["lin_macro_f1"])
    with pytest.raises(InputError, match="not one of the run's tasks"):
        scc.stream.validation(X, y_lin, task="donor")({**events[0], "model": model})


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), n_pad=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_masked_loss_equals_the_loss_of_the_real_rows(n, n_pad, seed):
    """The data-parallel CUDA graph pads minibatches: padding rows must change neither loss nor gradient."""
    from sccoreset._engine._objective import Objective

    g = torch.Generator().manual_seed(seed)
    obj = Objective([3, 4])
    logits = torch.randn(n + n_pad, 7, generator=g, requires_grad=True)
    targets = torch.stack([torch.randint(0, 3, (n + n_pad,), generator=g),
                           torch.randint(0, 4, (n + n_pad,), generator=g)], 1)  # fmt: skip
    w = torch.rand(7, generator=g) + 0.1
    mask = torch.cat([torch.ones(n), torch.zeros(n_pad)])
    masked = obj(logits, targets, w, mask)
    masked.backward()
    real = obj(logits[:n].detach(), targets[:n], w)
    torch.testing.assert_close(masked.detach(), real)
    assert torch.all(logits.grad[n:] == 0)
    # a minibatch of padding alone: loss 0 and no gradient (not NaN)
    logits.grad = None
    alone = obj(logits, targets, w, torch.zeros(n + n_pad))
    alone.backward()
    assert float(alone.detach()) == 0.0 and torch.all(logits.grad == 0)
