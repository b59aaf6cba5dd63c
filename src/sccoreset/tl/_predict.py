"""`tl.predict`: label new cells with the model stored in a coreset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._engine._model import load_model
from .._engine._train import host_logits
from .._errors import InputError
from ..pp._gene_space import GeneSpace
from ._device import resolve_device
from ._record import find_record, is_record


def load_classifier(
    coreset: AnnData, model: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, GeneSpace, list[str]]:
    """The trained model, its gene space and label order (of the first task), from a coreset."""
    rec = find_record(coreset)
    gs = GeneSpace.from_dict(rec["gene_space"])
    return load_model(rec["model"], model), gs, [str(c) for c in np.asarray(rec["classes"])]


def stored_tasks(coreset: AnnData) -> dict[str, list[str]]:
    """Label key -> classes of every task the coreset's model predicts, in the order of its logits."""
    rec = find_record(coreset)
    if "tasks" in rec and "label_keys" in rec:
        return {str(k): [str(c) for c in np.asarray(rec["tasks"][str(k)])] for k in np.asarray(rec["label_keys"])}
    return {str(rec.get("label_key", "label")): [str(c) for c in np.asarray(rec["classes"])]}


def predict(
    adata: AnnData,
    coreset: AnnData,
    *,
    layer: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 4096,
    key_added: str = "sccoreset",
    over_clustering: str | None = None,
    majority_voting: bool = False,
    model: torch.nn.Module | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict labels of new cells with the classifier stored in ``coreset``, as CellTypist annotates.

    ``adata`` is transformed through the coreset's gene space (genes matched by name, missing genes
    as zeros), exactly as the training chunks were. Written into ``adata``:

    - ``obs[f"{key_added}_prediction"]``: the predicted class (categorical over the coreset's classes);
    - ``obs[f"{key_added}_confidence"]``: the probability of the predicted class;
    - ``obsm[f"{key_added}_probabilities"]``: every class's probability, a DataFrame with the classes as
      columns and ``obs_names`` as index;
    - ``obs[f"{key_added}_majority_voting"]`` (with ``majority_voting=True``): the most frequent prediction
      within the cell's cluster;
    - ``uns[key_added]``: ``{"params": ..., "classes": ...}``, how the prediction was made.

    A multi-task model (trained with several label keys) writes the same outputs for every task ``t``,
    named ``f"{key_added}_{t}_prediction"``, ``f"{key_added}_{t}_confidence"``,
    ``f"{key_added}_{t}_probabilities"`` and ``f"{key_added}_{t}_majority_voting"``.

    Parameters
    ----------
    adata
        Cells with raw counts in ``X`` (or ``layers[layer]``).
    coreset
        The AnnData returned by :func:`~sccoreset.tl.stream_train`, or read back from its .h5ad.
    layer
        Read counts from this layer instead of ``X``.
    device
        ``"cuda"``, ``"cpu"`` (or any torch device); None: CUDA when available. The model is moved there.
    batch_size
        Cells per forward pass.
    key_added
        Prefix of the outputs (listed above).
    over_clustering
        obs column of a clustering (e.g. ``"leiden"``) for ``majority_voting``; sccoreset does not cluster.
    majority_voting
        Also label every cell with the most frequent prediction of its cluster in ``obs[over_clustering]``
        (ties go to the class listed first in the coreset).
    model
        An instance of the architecture, needed only when a custom model was trained.
    copy
        Return a copy with the results instead of writing into ``adata``.

    Returns
    -------
    None, or the annotated copy when ``copy=True``.

    Examples
    --------
    >>> sccoreset.tl.predict(adata, coreset, majority_voting=True, over_clustering="leiden")  # doctest: +SKIP
    >>> adata.obs[["sccoreset_prediction", "sccoreset_confidence", "sccoreset_majority_voting"]]  # doctest: +SKIP
    """
    if majority_voting and over_clustering is None:
        raise InputError(
            "majority_voting=True needs over_clustering=: an obs column of clusters, e.g. after "
            "sc.pp.neighbors(adata); sc.tl.leiden(adata) pass over_clustering='leiden'."
        )
    if over_clustering is not None and over_clustering not in adata.obs:
        raise InputError(
            f"over_clustering={over_clustering!r} is not a column of adata.obs (columns: {list(adata.obs)})."
        )
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not in adata.layers (layers: {list(adata.layers)}).")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if is_record(adata.uns.get(key_added)):
        # predicting on a coreset itself: its uns record and its training-dynamics obs columns
        # (f"{key_added}_confidence") would be overwritten
        raise InputError(
            f"adata.uns[{key_added!r}] holds a trained coreset's record; predicting with key_added={key_added!r} "
            "would overwrite it and the coreset's own columns. Pass another key_added, e.g. key_added='predicted'."
        )

    _refuse_gene_list_coreset(adata, layer)
    net, gs, _ = load_classifier(coreset, model)
    tasks = stored_tasks(coreset)
    dev = resolve_device(device)
    net = net.to(dev)
    counts = adata.X if layer is None else adata.layers[layer]
    X = gs.transform(counts, adata.var_names, source="adata")
    n_logits = sum(len(c) for c in tasks.values())
    logits = host_logits(net, X, dev, batch_size) if X.shape[0] else np.zeros((0, n_logits), np.float32)
    if logits.shape[1] != n_logits:
        raise InputError(
            f"the coreset's model outputs {logits.shape[1]} logits per cell, its classes number {n_logits}."
        )
    adata = adata.copy() if copy else adata
    lo = 0
    for task, classes in tasks.items():
        prefix = key_added if len(tasks) == 1 else f"{key_added}_{task}"
        part = torch.from_numpy(np.ascontiguousarray(logits[:, lo : lo + len(classes)])).double()
        lo += len(classes)
        prob = torch.softmax(part, 1).numpy()
        best = prob.argmax(1)
        names = pd.Index(np.asarray(classes, dtype=object), dtype=object)
        adata.obs[f"{prefix}_prediction"] = pd.Categorical.from_codes(best, categories=names)
        adata.obs[f"{prefix}_confidence"] = prob[np.arange(best.size), best]
        adata.obsm[f"{prefix}_probabilities"] = pd.DataFrame(prob, index=adata.obs_names.copy(), columns=names)
        if majority_voting:
            adata.obs[f"{prefix}_majority_voting"] = _majority_vote(adata.obs[over_clustering], best, names)
    classes = next(iter(tasks.values()))
    adata.uns[key_added] = {
        "params": {
            "layer": "None" if layer is None else str(layer),
            "device": dev,
            "batch_size": int(batch_size),
            "over_clustering": "None" if over_clustering is None else str(over_clustering),
            "majority_voting": bool(majority_voting),
            "model": "stored" if model is None else type(model).__name__,
            "coreset_label_key": str(find_record(coreset).get("label_key", "")),
        },
        "classes": np.asarray(classes, dtype=str),
    }
    if len(tasks) > 1:
        adata.uns[key_added]["tasks"] = {k: np.asarray(c, dtype=str) for k, c in tasks.items()}
    return adata if copy else None


def _refuse_gene_list_coreset(adata: AnnData, layer: str | None) -> None:
    """A ``genes="list"`` coreset holds no raw counts on every gene, so its cells cannot be transformed again.

    Its ``X`` holds features, and its ``layers["counts"]`` holds counts on the gene list only: normalising those
    by their own total gives other features than training did (the library size of all genes is gone).
    """
    for key, rec in adata.uns.items():
        if not is_record(rec) or str(rec.get("params", {}).get("genes", "list")) != "list":
            continue
        where = "X holds its features, not counts" if layer is None else (
            f"layers[{layer!r}] holds counts on its {adata.n_vars} list genes only, so their library sizes differ "
            "from training's"
        )  # fmt: skip
        raise InputError(
            f"adata is a coreset made with genes='list' (uns[{key!r}]): {where}. Predict from the original files' "
            "cells, or train with genes='all' (raw counts on every gene in X); the coreset's own cells already "
            "have their training scores in obs and their features in X."
        )


def _majority_vote(clusters: pd.Series, best: np.ndarray, names: pd.Index) -> pd.Categorical:
    """The most frequent predicted class within each cluster, for every cell; NaN for cells without a cluster."""
    codes = pd.Categorical(clusters).codes
    has = codes >= 0
    n_clusters = int(codes.max()) + 1 if has.any() else 0
    table = np.zeros((n_clusters, len(names)), dtype=np.int64)
    np.add.at(table, (codes[has], best[has]), 1)
    out = np.full(codes.size, -1, dtype=np.int64)
    out[has] = table.argmax(1)[codes[has]]
    return pd.Categorical.from_codes(out, categories=names)
