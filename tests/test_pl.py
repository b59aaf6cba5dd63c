from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection

import sccoreset as scc

KW = dict(chunk_size=250, buffer_size=60, epochs_per_step=2, hidden=(32,), final_epochs=2, progress=False)


@pytest.fixture(scope="module")
def coreset(small_stream, small_gene_space):
    return scc.tl.stream_train(
        small_stream.files, "cell_type", gene_space=small_gene_space, eval_data=small_stream.holdout, **KW
    )


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_chunk_distribution_history_stacks_buffer_by_chunk(coreset):
    ax = scc.pl.chunk_distribution(coreset, show=False)
    hist = coreset.uns["sccoreset"]["history"]
    polys = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(polys) == hist["buffer_chunk_counts"].shape[1]
    # the top of the stack is the buffer size at every step
    top = max(p.get_paths()[0].vertices[:, 1].max() for p in polys)
    assert top == pytest.approx(KW["buffer_size"])
    assert ax.get_xlabel() == "step"
    ax = scc.pl.chunk_distribution(coreset, by="file", show=False)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == hist["buffer_file_counts"].shape[1]


def test_chunk_distribution_final_table(coreset):
    ax = scc.pl.chunk_distribution(coreset, kind="final", show=False)
    img = ax.images[0].get_array()
    assert img.sum() == coreset.n_obs
    assert [t.get_text() for t in ax.get_xticklabels()] == list(coreset.uns["sccoreset"]["classes"])


def test_f1_trajectories_lines_and_labels(coreset, small_stream):
    ax = scc.pl.f1_trajectories(coreset, show=False)
    labels = [line.get_label() for line in ax.get_lines()]
    classes = list(coreset.uns["sccoreset"]["classes"])
    assert "macro-F1" in labels and "accuracy" in labels
    assert len(labels) == len(classes) + 2
    assert any(lab.startswith(small_stream.late_type) and "(late)" in lab for lab in labels)
    macro = ax.get_lines()[labels.index("macro-F1")]
    np.testing.assert_allclose(macro.get_ydata(), coreset.uns["sccoreset"]["history"]["macro_f1"])
    ax = scc.pl.f1_trajectories(coreset, classes=classes[:2], show=False)
    assert len(ax.get_lines()) == 4
    with pytest.raises(scc.InputError, match="not in the coreset's classes"):
        scc.pl.f1_trajectories(coreset, classes=["nope"], show=False)


def test_training_dynamics_points(coreset):
    ax = scc.pl.training_dynamics(coreset, show=False)
    pts = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert pts.shape[0] == coreset.n_obs
    expected = np.c_[coreset.obs["sccoreset_variability"], coreset.obs["sccoreset_confidence"]]
    np.testing.assert_allclose(np.sort(pts, axis=0), np.sort(expected, axis=0))
    ax = scc.pl.training_dynamics(coreset, color="forgetting", show=False)
    assert len(ax.collections[0].get_array()) == coreset.n_obs


def test_loss_and_scanpy_conventions(coreset, tmp_path):
    fig = scc.pl.loss(coreset, return_fig=True, save=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    ax = fig.axes[0]
    hist = coreset.uns["sccoreset"]["history"]
    epoch_line = ax.get_lines()[0]
    np.testing.assert_allclose(epoch_line.get_ydata(), hist["epoch_losses"].ravel())
    assert "consolidation" in [line.get_label() for line in ax.get_lines()]
    _, given = plt.subplots()
    assert scc.pl.loss(coreset, ax=given, show=False) is given


def test_palette_from_uns(coreset):
    cs = coreset.copy()
    n = len(cs.uns["sccoreset"]["classes"])
    cs.uns["cell_type_colors"] = np.array(["#ff0000"] * n)
    ax = scc.pl.f1_trajectories(cs, show=False)
    assert ax.get_lines()[0].get_color() == "#ff0000"


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({}, 1),
        ({"show": True}, 1),
        ({"show": False}, 0),
        ({"ax": "given"}, 0),
        ({"ax": "given", "show": True}, 1),
        ({"return_fig": True}, 0),
        ({"return_fig": True, "show": True}, 1),
        ({"save": "x.png"}, 0),
    ],
)
@pytest.mark.parametrize("plot", ["chunk_distribution", "f1_trajectories", "training_dynamics", "loss"])
def test_show_as_scanpy(coreset, monkeypatch, tmp_path, plot, kwargs, shown):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    kwargs = dict(kwargs)
    if kwargs.get("ax") == "given":
        _, kwargs["ax"] = plt.subplots()
    if "save" in kwargs:
        kwargs["save"] = tmp_path / kwargs["save"]
    out = getattr(scc.pl, plot)(coreset, **kwargs)
    assert len(calls) == shown
    if kwargs.get("return_fig"):
        assert isinstance(out, plt.Figure)
    elif shown:
        assert out is None
    else:
        assert out is kwargs.get("ax", out) and out.figure is not None
