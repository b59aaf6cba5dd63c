"""Plots of a streaming-coreset run, read from the coreset's ``uns["sccoreset"]``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from .._errors import InputError
from ._utils import budget_keys, class_colors, finish, history_array, new_axes, record, task_classes

_PLOT_ARGS = """ax
        Draw into these Axes instead of a new figure.
    show
        Call :func:`matplotlib.pyplot.show`. None (as scanpy): show unless ``ax`` was given, the figure is
        saved or ``return_fig=True``; False never shows.
    save
        Save the figure to this path.
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    The Axes (or the Figure with ``return_fig=True``); None when shown."""


def _plot_doc(func):
    """Fill the parameters every plot shares into the docstring."""
    func.__doc__ = func.__doc__.replace("{plot_args}", _PLOT_ARGS)
    return func


@_plot_doc
def chunk_distribution(
    coreset: AnnData,
    *,
    by: Literal["chunk", "file"] = "chunk",
    kind: Literal["history", "final"] = "history",
    task: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Where the buffer's cells came from.

    ``kind="history"``: stacked areas of the buffer's composition by source chunk (or file) at every
    step. ``kind="final"``: the final coreset as a chunk (or file) × class table of cell counts.

    Parameters
    ----------
    coreset
        AnnData returned by :func:`~sccoreset.tl.stream_train`.
    by
        Group cells by the chunk or the file they came from.
    kind
        ``"history"`` or ``"final"``.
    task
        The label key whose classes the ``"final"`` table shows, in a multi-task run (default the first).
    {plot_args}
    """
    rec = record(coreset)
    if by not in ("chunk", "file"):
        raise InputError(f"by must be 'chunk' or 'file', got {by!r}.")
    ax_given = ax is not None
    ax = new_axes(ax, (7, 4))
    if kind == "history":
        counts = history_array(rec, f"buffer_{by}_counts")
        steps = history_array(rec, "step")
        names = [f"{by} {i}" for i in range(counts.shape[1])]
        cmap = plt.get_cmap("viridis")
        colors = [cmap(i / max(counts.shape[1] - 1, 1)) for i in range(counts.shape[1])]
        ax.stackplot(steps, counts.T, labels=names, colors=colors)
        ax.set_xlabel("step")
        ax.set_ylabel("cells in buffer")
        ax.set_title(f"buffer composition by {by}")
        if counts.shape[1] <= 12:
            ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize="small", frameon=False)
    elif kind == "final":
        label_key, classes = task_classes(rec, task)
        col = "sccoreset_chunk" if by == "chunk" else "sccoreset_file"
        table = coreset.obs.groupby([col, label_key], observed=False).size().unstack(fill_value=0)
        table = table.reindex(columns=classes, fill_value=0)
        table = table.loc[table.sum(1) > 0]
        im = ax.imshow(table.to_numpy(), aspect="auto", cmap="Blues")
        ax.grid(False)
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
        ax.set_xlabel(label_key)
        ax.set_ylabel(by)
        ax.set_title(f"final coreset: {by} x class")
        ax.figure.colorbar(im, ax=ax, label="cells")
    else:
        raise InputError(f"kind must be 'history' or 'final', got {kind!r}.")
    return finish(ax, ax_given=ax_given, show=show, save=save, return_fig=return_fig)


@_plot_doc
def f1_trajectories(
    coreset: AnnData,
    *,
    classes: Sequence[str] | None = None,
    task: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Per-class F1 on the evaluation data against step, with macro-F1 and accuracy emphasised.

    Classes that appear late in the stream (dashed) and rare classes (dotted, < 1% of the cells
    seen) are easy to pick out.

    Parameters
    ----------
    coreset
        AnnData returned by :func:`~sccoreset.tl.stream_train` with ``eval_data``.
    classes
        Classes to draw (default all).
    task
        The label key whose F1 to draw, in a multi-task run (default the first).
    {plot_args}
    """
    rec = record(coreset)
    key, all_classes = task_classes(rec, task)
    hist = rec["history"]
    first_key = str(np.asarray(rec.get("label_keys", [rec.get("label_key")]))[0])
    if key != first_key:  # another task's metrics live under history["tasks"]
        hist = {**hist, **hist["tasks"][key]}
    f1 = history_array({"history": hist}, "f1")
    steps = history_array(rec, "step")
    chosen = all_classes if classes is None else [str(c) for c in classes]
    unknown = sorted(set(chosen) - set(all_classes))
    if unknown:
        raise InputError(f"classes: not in the coreset's classes: {unknown}.")
    seen = np.asarray(rec["history"]["chunk_class_counts"])
    if seen.shape[1] != len(all_classes) or budget_keys(rec) != [key]:
        seen = np.ones((len(steps), len(all_classes)))  # counts are of the budget's classes: no late/rare tags
    first = np.array([np.flatnonzero(seen[:, i])[0] if seen[:, i].any() else -1 for i in range(len(all_classes))])
    share = seen.sum(0) / max(seen.sum(), 1)
    colors = class_colors(coreset, all_classes)
    ax_given = ax is not None
    ax = new_axes(ax, (7, 4))
    for name in chosen:
        i = all_classes.index(name)
        late = first[i] >= max(1, len(steps) // 2)
        style = ":" if share[i] < 0.01 else "--" if late else "-"
        tag = " (rare)" if share[i] < 0.01 else " (late)" if late else ""
        ax.plot(steps, f1[:, i], style, color=colors[i], lw=1.2, label=name + tag)
    ax.plot(steps, history_array({"history": hist}, "macro_f1"), color="black", lw=3, label="macro-F1")
    ax.plot(steps, history_array({"history": hist}, "accuracy"), color="grey", lw=3, label="accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("F1 on evaluation data")
    ax.set_title("per-class F1 along the stream" + (f" ({key})" if "tasks" in rec else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize="small", frameon=False)
    return finish(ax, ax_given=ax_given, show=show, save=save, return_fig=return_fig)


@_plot_doc
def training_dynamics(
    coreset: AnnData,
    *,
    color: Literal["class", "forgetting"] = "class",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Dataset-cartography map of the kept cells: mean confidence against its variability across epochs.

    Easy cells sit top left, ambiguous ones to the right, hard (possibly mislabelled) ones bottom left.

    Parameters
    ----------
    coreset
        AnnData returned by :func:`~sccoreset.tl.stream_train`.
    color
        Colour by class (palette from ``uns[f"{label_key}_colors"]`` if present) or by forgetting events.
    {plot_args}
    """
    rec = record(coreset)
    obs = coreset.obs
    x = obs["sccoreset_variability"].to_numpy()
    y = obs["sccoreset_confidence"].to_numpy()
    ax_given = ax is not None
    ax = new_axes(ax, (6, 5))
    if color == "class":
        classes = [str(c) for c in rec["classes"]]
        colors = class_colors(coreset, classes)
        labels = obs[str(rec["label_key"])].astype(str).to_numpy()
        for i, name in enumerate(classes):
            sel = labels == name
            if sel.any():
                ax.scatter(x[sel], y[sel], s=12, color=colors[i], label=name, edgecolors="none")
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize="small", frameon=False, markerscale=1.5)
    elif color == "forgetting":
        sc = ax.scatter(x, y, s=12, c=obs["sccoreset_forgetting"].to_numpy(), cmap="magma_r", edgecolors="none")
        ax.figure.colorbar(sc, ax=ax, label="forgetting events")
    else:
        raise InputError(f"color must be 'class' or 'forgetting', got {color!r}.")
    ax.set_xlabel("variability (std of true-class probability)")
    ax.set_ylabel("confidence (mean true-class probability)")
    ax.set_title("training dynamics of the coreset")
    return finish(ax, ax_given=ax_given, show=show, save=save, return_fig=return_fig)


@_plot_doc
def loss(
    coreset: AnnData,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
):
    """Training loss of every epoch along the stream, steps marked; the final consolidation at the end.

    Parameters
    ----------
    coreset
        AnnData returned by :func:`~sccoreset.tl.stream_train`.
    {plot_args}
    """
    rec = record(coreset)
    epochs = history_array(rec, "epoch_losses")
    n_steps, per_step = epochs.shape
    ax_given = ax is not None
    ax = new_axes(ax, (7, 3.5))
    xs = np.arange(n_steps * per_step) / per_step
    ax.plot(xs, epochs.ravel(), color="tab:blue", lw=1, label="epoch loss")
    # steps stopped early (step_patience) have NaN after their last epoch
    done = np.isfinite(epochs).sum(1)
    last = epochs[np.arange(n_steps), np.maximum(done - 1, 0)]
    ax.plot(np.arange(n_steps) + (done - 1) / per_step, last, "o", color="tab:blue", ms=4, label="end of step")
    final = rec["history"].get("final", {})
    fl = np.asarray(final.get("epoch_losses", []), dtype=float)
    if fl.size:
        ax.plot(n_steps + np.arange(fl.size) / fl.size, fl, color="tab:orange", lw=1.5, label="consolidation")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend(frameon=False, fontsize="small")
    return finish(ax, ax_given=ax_given, show=show, save=save, return_fig=return_fig)
