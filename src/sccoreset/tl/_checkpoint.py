"""Atomic checkpoints of the whole loop state as plain arrays, and the checks that a resume continues the same run.

A checkpoint holds only tensors, numbers, strings, lists and dicts (numpy arrays are stored as
tensors, string arrays as lists), so it loads with ``torch.load(weights_only=True)``: no pickled
classes, nothing executed on load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import InputError
from .._io._sources import Source

CHECKPOINT_NAME = "sccoreset_checkpoint.pt"
SCHEMA_VERSION = 3  # 3: buffer targets, tasks, regularizer state
_STRINGS = "__strings__"
_TUPLE = "__tuple__"
# subtrees that stay torch tensors when read back (the rest become numpy arrays again)
_TORCH_KEYS = ("model", "optimizer", "generator", "torch_rng", "cuda_rng", "regularizer")


def files_fingerprint(sources: Sequence[Source]) -> list[dict[str, Any]]:
    """What identifies the stream: each input's name, cells, genes and (for files) size on disk."""
    out = []
    for s in sources:
        entry = {"name": s.name, "n_obs": int(s.n_obs), "n_vars": len(s.var_names)}
        if s.path is not None:
            entry["bytes"] = _size_on_disk(Path(s.path))
        out.append(entry)
    return out


def _size_on_disk(path: Path) -> int:
    if path.is_dir():  # a zarr store
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def encode(obj: Any) -> Any:
    """Plain, ``weights_only``-loadable form: arrays as tensors, string arrays as tagged lists."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OUS":
            return {_STRINGS: [str(v) for v in obj.tolist()]}
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        # int keys stay ints: the optimizer's state is keyed by parameter index
        return {(k if isinstance(k, int) else str(k)): encode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def decode(obj: Any, *, keep_tensors: bool = False) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, torch.Tensor):
        return obj if keep_tensors else obj.numpy()
    if isinstance(obj, dict):
        if set(obj) == {_STRINGS}:
            return np.asarray(obj[_STRINGS], dtype=object)
        if set(obj) == {_TUPLE}:
            return tuple(decode(v, keep_tensors=keep_tensors) for v in obj[_TUPLE])
        return {k: decode(v, keep_tensors=keep_tensors or k in _TORCH_KEYS) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, keep_tensors=keep_tensors) for v in obj]
    return obj


def write_checkpoint(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically: to a temporary file, fsync, rename over the previous checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(encode({"schema_version": SCHEMA_VERSION, **payload}), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return final


def read_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{path}: not a readable sccoreset checkpoint ({type(e).__name__}: {reason[:200]}); "
            "delete it or use another checkpoint_dir."
        ) from e
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{path}: checkpoint schema {version} is not {SCHEMA_VERSION} (written by another sccoreset version); "
            "start afresh without resume=True or with another checkpoint_dir."
        )
    return decode(raw)


def check_same_run(
    payload: Mapping[str, Any], params: Mapping[str, str], files: list[dict[str, Any]], where: Path
) -> None:
    """Refuse to resume a checkpoint made with other parameters or other files, saying which differ."""
    saved = payload["params"]
    diff = sorted(k for k in set(saved) | set(params) if saved.get(k) != params.get(k))
    if diff:
        shown = ", ".join(f"{k} (checkpoint {saved.get(k)}, now {params.get(k)})" for k in diff[:8])
        raise InputError(f"resume: {where} was made with different parameters: {shown}.")
    if payload["files"] != files:
        before = {f["name"]: f for f in payload["files"]}
        after = {f["name"]: f for f in files}
        changed = sorted(set(before) ^ set(after)) + sorted(
            n for n in set(before) & set(after) if before[n] != after[n]
        )
        if not changed and [f["name"] for f in payload["files"]] != [f["name"] for f in files]:
            changed = ["the order of the files"]
        raise InputError(f"resume: {where} was made on other files; differing: {changed[:8]}.")
