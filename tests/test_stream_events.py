"""The run as a stream of events: stages compose, a stream stopped early still gives a coreset."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

import sccoreset as scc
from sccoreset import stream as st

KW = dict(chunk_size=300, buffer_size=60, epochs_per_step=1, final_epochs=1, hidden=(16,), progress=False)


def test_stream_train_equals_collecting_stream_events(small_stream, small_gene_space):
    a = scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, random_state=4, **KW)
    with scc.tl.stream_events(
        small_stream.files, "cell_type", gene_space=small_gene_space, random_state=4, **KW
    ) as events:
        collected = st.collect(events)
        b = events.coreset()
    assert [e["step"] for e in collected] == [0, 1, 2, 3, "final"]
    assert all("model" not in e for e in collected)
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(
        a.uns["sccoreset"]["history"]["train_loss"], b.uns["sccoreset"]["history"]["train_loss"]
    )
    assert b.uns["sccoreset"]["params"]["finished"]


def test_stages_compose_and_sink_to_jsonl(small_stream, small_gene_space, tmp_path):
    holdout = ad.read_h5ad(small_stream.holdout)
    with scc.tl.stream_events(
        small_stream.files, "cell_type", gene_space=small_gene_space, eval_data=holdout, **KW
    ) as events:
        classes = events.run.classes
        X = small_gene_space.transform(holdout.X, holdout.var_names)
        y = np.array([classes.index(c) for c in holdout.obs["cell_type"].astype(str)])
        seen = []
        n = st.collect_jsonl(
            st.pipe(
                events,
                st.augment(st.param_norm),
                st.augment(st.validation(X, y)),
                st.tap(seen.append),
                st.early_stop("val_macro_f1", patience=1, min_delta=1.0),  # no gain of 1.0: stops after 2 steps
            ),
            tmp_path / "events.jsonl",
        )
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert n == len(lines) == 2 == len(seen)
    assert all(line["param_norm"] > 0 and 0 <= line["val_macro_f1"] <= 1 for line in lines)
    assert lines[-1]["early_stop"] is True and "model" not in lines[-1]
    # the validation augmenter agrees with the engine's own evaluation on the same held-out cells
    assert lines[0]["val_accuracy"] == pytest.approx(lines[0]["accuracy"], abs=2 / holdout.n_obs)


def test_a_stream_stopped_early_gives_a_valid_coreset(small_stream, small_gene_space, tmp_path):
    with scc.tl.stream_events(small_stream.files, "cell_type", gene_space=small_gene_space, **KW) as events:
        taken = st.collect(st.pipe(events, st.take(2)))
        coreset = events.coreset()
    assert [e["step"] for e in taken] == [0, 1]
    params = coreset.uns["sccoreset"]["params"]
    assert params["steps_done"] == 2 and not params["finished"]
    assert params["cells_not_read"] == 2 * KW["chunk_size"]
    assert coreset.n_obs == KW["buffer_size"]
    assert set(coreset.obs["sccoreset_chunk"]) <= {0, 1}
    coreset.write_h5ad(tmp_path / "early.h5ad")
    back = ad.read_h5ad(tmp_path / "early.h5ad")
    assert list(back.obs_names) == list(coreset.obs_names)


def test_early_stop_patience_and_mode():
    events = [{"step": i, "m": v} for i, v in enumerate([0.1, 0.3, 0.3, 0.29, 0.5])]
    out = list(st.pipe(events, st.early_stop("m", patience=2)))
    assert [e["step"] for e in out] == [0, 1, 2, 3] and out[-1]["early_stop"]
    out = list(st.pipe(events, st.early_stop("m", patience=1, mode="min")))
    assert [e["step"] for e in out] == [0, 1]
    assert list(st.pipe([{"step": "final"}], st.early_stop("m", patience=1))) == [{"step": "final"}]
    with pytest.raises(scc.InputError, match="patience must be positive"):
        st.early_stop("m", patience=0)
    assert list(st.pipe(events, st.take(0))) == []


def test_coreset_weights_give_the_stream_class_proportions(small_stream, small_gene_space):
    cs = scc.tl.stream_train(small_stream.files, "cell_type", gene_space=small_gene_space, **KW)
    info = scc.pp.scan(small_stream.files, "cell_type")
    stream_counts = info.label_counts.sum(0)
    weighted = cs.obs.groupby("cell_type", observed=True)["sccoreset_weight"].sum()
    for c, n in stream_counts.items():
        assert weighted.get(c, 0.0) == pytest.approx(n)  # every class seen keeps cells at this buffer size
    assert cs.obs["sccoreset_weight"].sum() == pytest.approx(info.n_cells)


def test_epoch_events_precede_their_step(small_stream, small_gene_space):
    kw = {**KW, "epochs_per_step": 2}
    with scc.tl.stream_events(
        small_stream.files, "cell_type", gene_space=small_gene_space, epochs=True, **kw
    ) as events:
        seen = st.collect(events)
    kinds = [(e.get("kind", "step"), e["step"], e.get("epoch")) for e in seen]
    assert kinds[:3] == [("epoch", 0, 0), ("epoch", 0, 1), ("step", 0, None)]
    steps = [e for e in seen if "kind" not in e]
    epochs = [e for e in seen if e.get("kind") == "epoch" and e["step"] == 0]
    np.testing.assert_allclose([e["train_loss"] for e in epochs], steps[0]["epoch_losses"])
    # epoch events carry train_loss too: a stage on it sees both kinds
    assert len(list(st.pipe(iter(seen), st.early_stop("train_loss", patience=100, mode="min")))) == len(seen)
