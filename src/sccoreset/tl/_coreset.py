"""Assemble the coreset AnnData from the final buffer: features, counts read back by provenance, obs, uns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._engine._loop import Buffer
from .._engine._model import model_record
from .._io._sources import Source
from .._utils import h5ad_safe_strings
from ..pp._gene_space import GeneSpace

SCORE_COLUMNS = ("aum", "confidence", "variability", "forgetting", "loss")


def _counts_on_genes(sources: Sequence[Source], buffer: Buffer, gene_space: GeneSpace) -> sp.csr_matrix:
    """Raw counts of the kept cells on the gene list, read back from their files by provenance."""
    n = len(buffer)
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    parts, where = [], []
    for f in np.unique(files):
        sel = np.flatnonzero(files == f)
        order = sel[np.argsort(rows[sel])]
        src = sources[f]
        block = src.read_rows_at(rows[order])
        m = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(order.size, len(src.var_names)))
        col_map = gene_space.column_map(src.var_names, source=src.name)
        keep = col_map >= 0
        # columns of the file that are on the gene list, moved to their place in it
        proj = sp.csr_matrix(
            (np.ones(keep.sum(), np.float32), (np.flatnonzero(keep), col_map[keep])),
            shape=(len(src.var_names), gene_space.n_genes),
        )
        parts.append((m @ proj).astype(np.float32))
        where.append(order)
    stacked = sp.vstack(parts, format="csr")
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(n)
    return stacked[inverse]


def _obs(sources: Sequence[Source], buffer: Buffer, classes: Sequence[str], label_key: str) -> pd.DataFrame:
    files = buffer.provenance["file"]
    rows = buffer.provenance["row"]
    frames = []
    for f in np.unique(files):
        sel = np.flatnonzero(files == f)
        obs = sources[f].read_obs(rows[sel])
        obs.index = np.arange(sel.size)
        obs["_pos"] = sel
        frames.append(obs)
    obs = pd.concat(frames, ignore_index=True).sort_values("_pos").drop(columns="_pos").reset_index(drop=True)
    for col in obs.columns:  # columns missing from some files: keep h5ad-writable dtypes
        if obs[col].dtype == object:
            obs[col] = pd.Categorical(obs[col].astype(str))
    obs[label_key] = pd.Categorical([classes[i] for i in buffer.y], categories=list(classes))
    names = [sources[f].name for f in range(len(sources))]
    obs["sccoreset_file"] = pd.Categorical([names[f] for f in files], categories=names)
    obs["sccoreset_row"] = rows.astype(np.int64)
    obs["sccoreset_chunk"] = buffer.provenance["chunk"].astype(np.int64)
    obs["sccoreset_step_added"] = buffer.provenance["step_added"].astype(np.int64)
    for key in SCORE_COLUMNS:
        obs[f"sccoreset_{key}"] = np.asarray(buffer.scores[key], dtype=np.float64)
    obs.index = pd.Index(buffer.provenance["obs_name"].astype(str))
    if obs.index.has_duplicates:  # the same obs name in two files: make them unique, keep the original
        obs["sccoreset_obs_name"] = obs.index.to_numpy()
        obs.index = [f"{n}-{f}" for n, f in zip(obs.index, files, strict=True)]
    return obs


def history_from_events(events: list[dict[str, Any]], n_classes: int) -> dict[str, Any]:
    """Per-step arrays from the event stream (the final consolidation step is stored separately)."""
    steps = [e for e in events if e["step"] != "final"]
    n_chunks = max((len(e["buffer_chunk_counts"]) for e in events), default=0)
    n_files = max((len(e["buffer_file_counts"]) for e in events), default=0)
    hist: dict[str, Any] = {
        "step": np.array([e["step"] for e in steps], dtype=np.int64),
        "chunk": np.array([e["chunk"] for e in steps], dtype=np.int64),
        "n_chunk": np.array([e["n_chunk"] for e in steps], dtype=np.int64),
        "train_loss": np.array([e["train_loss"] for e in steps], dtype=np.float64),
        "epoch_losses": np.array([e["epoch_losses"] for e in steps], dtype=np.float64),
        "buffer_class_counts": np.array([e["buffer_class_counts"] for e in steps], dtype=np.int64).reshape(
            -1, n_classes
        ),
        "chunk_class_counts": np.array([e["chunk_class_counts"] for e in steps], dtype=np.int64).reshape(-1, n_classes),
        "buffer_chunk_counts": np.array(
            [np.pad(e["buffer_chunk_counts"], (0, n_chunks - len(e["buffer_chunk_counts"]))) for e in steps],
            dtype=np.int64,
        ).reshape(-1, n_chunks),
        "buffer_file_counts": np.array(
            [np.pad(e["buffer_file_counts"], (0, n_files - len(e["buffer_file_counts"]))) for e in steps],
            dtype=np.int64,
        ).reshape(-1, n_files),
    }
    for key in ("wait_seconds", "train_seconds", "select_seconds", "eval_seconds"):
        hist[key] = np.array([e[key] for e in steps], dtype=np.float64)
    if steps and "macro_f1" in steps[0]:
        hist["accuracy"] = np.array([e["accuracy"] for e in steps], dtype=np.float64)
        hist["macro_f1"] = np.array([e["macro_f1"] for e in steps], dtype=np.float64)
        hist["f1"] = np.array([e["f1"] for e in steps], dtype=np.float64).reshape(-1, n_classes)
    final = [e for e in events if e["step"] == "final"]
    if final:
        f = final[0]
        hist["final"] = {"train_loss": f["train_loss"], "epoch_losses": f["epoch_losses"]}
        if "macro_f1" in f:
            hist["final"].update(accuracy=f["accuracy"], macro_f1=f["macro_f1"], f1=f["f1"])
    return hist


def _storable(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if v is None:
            out[k] = "None"
        elif isinstance(v, bool | int | float | str | np.integer | np.floating):
            out[k] = v
        else:
            out[k] = json.dumps(v) if isinstance(v, list | tuple | dict) else str(v)
    return out


def build_coreset(
    sources: Sequence[Source],
    buffer: Buffer,
    events: list[dict[str, Any]],
    *,
    gene_space: GeneSpace,
    classes: Sequence[str],
    label_key: str,
    model: Any,
    spec: dict | None,
    params: dict[str, Any],
) -> AnnData:
    obs = _obs(sources, buffer, classes, label_key)
    counts = _counts_on_genes(sources, buffer, gene_space)
    var = pd.DataFrame({"mean": gene_space.mean, "std": gene_space.std}, index=pd.Index(gene_space.genes.astype(str)))
    adata = AnnData(
        X=np.ascontiguousarray(buffer.X),
        obs=h5ad_safe_strings(obs),
        var=h5ad_safe_strings(var),
        layers={"counts": counts},
    )
    adata.uns["sccoreset"] = {
        "params": _storable(params),
        "label_key": label_key,
        "classes": np.asarray(classes, dtype=str),
        "files": np.asarray([s.name for s in sources], dtype=str),
        "gene_space": gene_space.to_dict(),
        "history": history_from_events(events, len(classes)),
        "model": model_record(model.cpu(), spec),
    }
    return adata
