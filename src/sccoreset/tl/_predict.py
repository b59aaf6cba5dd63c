"""`tl.predict`: label new cells with the model stored in a coreset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._engine._loop import _predict_logits
from .._engine._model import load_model
from .._errors import InputError
from ..pp._gene_space import GeneSpace


def load_classifier(
    coreset: AnnData, model: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, GeneSpace, list[str]]:
    """The trained model, its gene space and label order, from a coreset (in memory or read from disk)."""
    if "sccoreset" not in coreset.uns:
        raise InputError("coreset: no uns['sccoreset']; pass the AnnData returned by sccoreset.tl.stream_train.")
    rec = coreset.uns["sccoreset"]
    gs = GeneSpace.from_dict(rec["gene_space"])
    return load_model(rec["model"], model), gs, [str(c) for c in np.asarray(rec["classes"])]


def predict(
    adata: AnnData,
    coreset: AnnData,
    *,
    key_added: str = "sccoreset_prediction",
    layer: str | None = None,
    model: torch.nn.Module | None = None,
    batch_size: int = 4096,
    copy: bool = False,
) -> AnnData | None:
    """Predict labels of new cells with the classifier stored in ``coreset``.

    ``adata`` is transformed through the coreset's gene space (genes matched by name, missing genes
    as zeros), exactly as the training chunks were.

    Parameters
    ----------
    adata
        Cells with raw counts in ``X`` (or ``layers[layer]``).
    coreset
        The AnnData returned by :func:`~sccoreset.tl.stream_train`, or read back from its .h5ad.
    key_added
        obs column of the predicted label; its probability goes to ``f"{key_added}_probability"``.
    layer
        Read counts from this layer instead of ``X``.
    model
        An instance of the architecture, needed only when a custom model was trained.
    batch_size
        Cells per forward pass.
    copy
        Return a copy with the columns added instead of writing into ``adata``.

    Returns
    -------
    None, or the annotated copy when ``copy=True``.
    """
    net, gs, classes = load_classifier(coreset, model)
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not in adata.layers (layers: {list(adata.layers)}).")
    counts = adata.X if layer is None else adata.layers[layer]
    X = gs.transform(counts, adata.var_names, source="adata")
    logits = _predict_logits(net, X, "cpu", batch_size)
    prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    best = prob.argmax(1)
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical(np.asarray(classes)[best], categories=classes)
    adata.obs[f"{key_added}_probability"] = prob[np.arange(best.size), best].astype(np.float64)
    return adata if copy else None
