"""Training options: any loss callable (binary labels too), early stopping within a step, de-duplicated draws."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import sccoreset as scc
import sccoreset._engine._train as train_mod
from sccoreset._engine._loop import first_occurrences
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._objective import Objective
from sccoreset._engine._train import make_optimizer, stratified_holdout, train_epochs
from sccoreset._errors import InputError

FAST = dict(chunk_size=300, buffer_size=60, epochs_per_step=2, final_epochs=1, progress=False, n_top_genes=100)


def bce_on_margin(logits, targets, weights):
    """A binary loss on the difference of the two logits, weighted per cell."""
    return F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], targets.float(), weight=weights)


@pytest.fixture(scope="module")
def binary_stream(small_stream, tmp_path_factory):
    """The small stream relabelled as one lineage against the rest (binary labels)."""
    d = tmp_path_factory.mktemp("binary")
    target = sorted(set(small_stream.lineage.values()))[0]
    out = []
    for f in [*small_stream.files, small_stream.holdout]:
        a = ad.read_h5ad(f)
        is_target = a.obs["cell_type"].astype(str).map(small_stream.lineage) == target
        a.obs["is_target"] = pd.Categorical(np.where(is_target, "yes", "no"))
        a.write_h5ad(d / f.name)
        out.append(d / f.name)
    return out[:-1], out[-1]


def test_custom_loss_trains_binary_labels(binary_stream):
    files, holdout = binary_stream
    calls = []

    def loss(logits, targets, weights):
        calls.append(logits.shape)
        return bce_on_margin(logits, targets, weights)

    coreset = scc.tl.stream_train(files, "is_target", loss=loss, eval_data=holdout, **FAST)
    assert calls and all(shape[1] == 2 for shape in calls)
    assert coreset.uns["sccoreset"]["history"]["macro_f1"][-1] > 0.8
    assert coreset.uns["sccoreset"]["params"]["loss"].endswith("loss")  # stored by name, never an address
    with pytest.raises(InputError, match="loss must be a callable"):
        scc.tl.stream_train(files, "is_target", loss="bce", **FAST)


def test_objective_sums_tasks_and_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(16, 5)
    targets = torch.stack([torch.randint(0, 3, (16,)), torch.randint(0, 2, (16,))], 1)
    obj = Objective([3, 2], balance_loss=False)
    expected = F.cross_entropy(logits[:, :3], targets[:, 0]) + F.cross_entropy(logits[:, 3:], targets[:, 1])
    torch.testing.assert_close(obj(logits, targets), expected)
    w = torch.from_numpy(obj.weights([np.array([8, 4, 4]), np.array([12, 4])])).float()
    weighted = F.cross_entropy(logits[:, :3], targets[:, 0], weight=w[:3]) + F.cross_entropy(
        logits[:, 3:], targets[:, 1], weight=w[3:]
    )
    torch.testing.assert_close(obj(logits, targets, w), weighted)


def test_stratified_holdout_takes_a_fraction_of_every_class_and_spares_rare_ones():
    sizes = [2, 3, 10, 40, 1]
    strata = np.repeat(np.arange(5), sizes)
    held = stratified_holdout(strata, 0.2, torch.Generator().manual_seed(0))
    assert [int(held[strata == c].sum()) for c in range(5)] == [0, 1, 2, 8, 0]
    many_small = np.repeat(np.arange(60), [2] * 50 + [3] * 5 + [100] * 5)
    held = stratified_holdout(many_small, 0.1, torch.Generator().manual_seed(0))
    assert held.sum() == 50 and not held[many_small < 55].any()  # only the large classes give cells


def test_early_stopping_restores_the_best_weights(monkeypatch):
    torch.manual_seed(0)
    X = torch.randn(200, 10)
    y = torch.randint(0, 3, (200,))
    model = build_model(mlp_spec(10, 3, (8,)))
    opt = make_optimizer(model, 1e-2)
    scripted = iter([1.0, 0.5, 0.8, 0.9, 0.95, 0.1, 0.1])
    snapshots = []
    real = train_mod._held_out_loss

    def fake(module, *args):
        real(module, *args)  # still records the held-out cells' dynamics
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(train_mod, "_held_out_loss", fake)
    dyn, losses = train_epochs(
        model, opt, X, y, epochs=7, batch_size=32, n_classes=3, generator=torch.Generator().manual_seed(0),
        patience=3, min_delta=0.0,
    )  # fmt: skip
    # best at epoch 2 (0.5), three epochs without improvement: stop after epoch 5, epoch 2's weights back
    assert len(losses) == 5 and len(snapshots) == 5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])
    assert not torch.equal(snapshots[1]["0.weight"], snapshots[4]["0.weight"])
    stats = dyn.to_numpy()
    assert np.isfinite(stats["aum"]).all() and (stats["confidence"] > 0).all()  # every cell scored, held-out too


def test_step_patience_in_stream_train(small_stream):
    coreset = scc.tl.stream_train(
        small_stream.files, small_stream.label_key, step_patience=1, epochs_per_step=6,
        **{k: v for k, v in FAST.items() if k != "epochs_per_step"},
    )  # fmt: skip
    epochs = coreset.uns["sccoreset"]["history"]["epoch_losses"]
    assert coreset.n_obs == 60 and epochs.shape[0] == 4


def test_first_occurrences():
    files = np.array([0, 0, 1, 0, 1])
    rows = np.array([5, 6, 5, 5, 7])
    np.testing.assert_array_equal(first_occurrences(files, rows), [0, 1, 2, 4])
    assert first_occurrences(files[:3], rows[:3]) is None


def test_gene_space_fitted_on_a_sample_of_cells(small_stream):
    coreset = scc.tl.stream_train(small_stream.files, small_stream.label_key, gene_space_cells=400, **FAST)
    n_fit = int(coreset.uns["sccoreset"]["gene_space"]["n_cells"])
    assert 400 <= n_fit < 1200  # whole blocks until 400 cells, not the 1,200 of the stream
    full = scc.tl.stream_train(small_stream.files, small_stream.label_key, **FAST)
    assert int(full.uns["sccoreset"]["gene_space"]["n_cells"]) == 1200


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("regularizer", "l2", "regularizer must be one of"),
        ("genes", "some", "genes must be one of"),
        ("step_val_fraction", 0.9, r"step_val_fraction must be in \(0.0, 0.5\]"),
        ("step_patience", 0, "step_patience must be positive"),
        ("ewc_decay", 1.5, "ewc_decay must be in"),
        ("budget_key", [], "budget_key must be an obs key or a sequence of obs keys"),
        ("n_draws", -1, "n_draws must be positive"),
    ],
)
def test_new_options_are_checked(option, value, message):
    with pytest.raises(InputError, match=message):
        scc.tl.StreamConfig(**{option: value})


def test_a_missing_task_column_is_named(small_stream):
    with pytest.raises(InputError, match="obs has no column 'nope'"):
        scc.tl.stream_train(small_stream.files, ["cell_type", "nope"], **FAST)


@pytest.mark.parametrize("options", [{"regularizer": "ewc"}, {"regularizer": "agem", "step_patience": 1}])
def test_interrupted_multitask_run_with_a_guard_resumes_exactly(small_stream, tmp_path, options):
    keys = ["cell_type", "lineage"]
    kw = {**FAST, "chunk_size": 200, **options}
    whole = scc.tl.stream_train(small_stream.files, keys, checkpoint_dir=tmp_path / "a", **kw)
    with scc.tl.stream_events(small_stream.files, keys, checkpoint_dir=tmp_path / "b", **kw) as events:
        for _, _ in zip(range(3), events, strict=False):
            pass  # stopped after 3 of 6 steps; the checkpoint holds the regularizer's state
    resumed = scc.tl.stream_train(small_stream.files, keys, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert list(resumed.obs_names) == list(whole.obs_names)
    np.testing.assert_array_equal(resumed.X, whole.X)
    for key in keys:
        assert list(resumed.obs[key]) == list(whole.obs[key])


def test_weighted_order_weights_stand_for_the_files_cells(small_stream):
    coreset = scc.tl.stream_train(small_stream.files, "cell_type", order="weighted", n_draws=3000, **FAST)
    truth = pd.concat([ad.read_h5ad(f).obs for f in small_stream.files])["cell_type"].astype(str).value_counts()
    got = coreset.obs.groupby(coreset.obs["cell_type"].astype(str))["sccoreset_weight"].sum()
    # 3,000 draws with replacement from 1,200 cells: the weights still count each file cell once
    np.testing.assert_allclose(got.reindex(truth.index).fillna(0).to_numpy(), truth.to_numpy())


def test_min_per_class_counts_only_combinations_the_files_hold(small_stream):
    keys = ["cell_type", "lineage"]
    # every type has one lineage: 12 x 4 possible combinations, 12 present; 12 x 4 cells fit a buffer of 60
    coreset = scc.tl.stream_train(small_stream.files, keys, budget_key=keys, min_per_class=4, **FAST)
    assert coreset.n_obs == 60
