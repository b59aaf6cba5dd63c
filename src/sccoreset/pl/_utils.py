"""Shared plumbing of the plots: axes, saving, showing, palettes, reading the history."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from .._errors import InputError
from ..tl._record import find_record


def record(coreset: AnnData) -> dict[str, Any]:
    """The stream_train record in ``coreset.uns`` (``"sccoreset"`` or the ``key_added`` of the run)."""
    return find_record(coreset)


def class_colors(coreset: AnnData, classes: Sequence[str]) -> list:
    """Colours from ``uns[f"{label_key}_colors"]`` when present (scanpy convention), else tab20."""
    key = str(record(coreset).get("label_key", ""))
    stored = coreset.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(classes):
        return list(stored)[: len(classes)]
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(len(classes))]


def new_axes(ax: Axes | None, figsize=(6, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def finish(ax: Axes, *, ax_given: bool, show: bool | None, save: str | Path | None, return_fig: bool):
    """scanpy-style ending: save if asked, show, return the Axes or the Figure.

    ``show=None`` shows unless the caller passed its own ``ax``, asked for the Figure
    (``return_fig=True``) or saved it (as scanpy); ``show=False`` never calls :func:`matplotlib.pyplot.show`.
    Returns None when shown, else the Axes (the Figure with ``return_fig=True``).
    """
    fig = ax.figure
    if save:
        fig.savefig(save, bbox_inches="tight")
    if show is None:
        show = not (ax_given or return_fig or save)
    if show:
        plt.show()
    if return_fig:
        return fig
    return None if show else ax


def history_array(rec: dict[str, Any], key: str) -> np.ndarray:
    hist = rec["history"]
    if key not in hist:
        raise InputError(f"coreset: the history has no {key!r} (was stream_train given eval_data?).")
    return np.asarray(hist[key])


def task_classes(rec: dict[str, Any], task: str | None) -> tuple[str, list[str]]:
    """The label key and classes of ``task`` (default: the first task)."""
    keys = [str(k) for k in np.asarray(rec.get("label_keys", [rec.get("label_key", "")]))]
    key = keys[0] if task is None else str(task)
    if key not in keys:
        raise InputError(f"task={task!r} is not a label key of the run; its label keys are {keys}.")
    if "tasks" in rec:
        return key, [str(c) for c in np.asarray(rec["tasks"][key])]
    return key, [str(c) for c in np.asarray(rec["classes"])]


def budget_keys(rec: dict[str, Any]) -> list[str]:
    """The label keys whose classes the buffer's budget balanced (default: the first label key)."""
    stored = rec.get("params", {}).get("budget_key", "None")
    if isinstance(stored, str) and stored != "None":
        return [str(k) for k in json.loads(stored)]
    keys = np.asarray(rec.get("label_keys", [rec.get("label_key", "")]))
    return [str(keys[0])]
