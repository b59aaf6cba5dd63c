"""Atomic checkpoints of the whole loop state, and the checks that a resume continues the same run."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._errors import InputError
from .._io._sources import Source

CHECKPOINT_NAME = "sccoreset_checkpoint.pt"
FORMAT_VERSION = 1
# parameters that may change between the interrupted run and its resume without changing the result
NOT_COMPARED = ("progress", "prefetch", "checkpoint_dir", "checkpoint_every", "resume", "device")


def files_fingerprint(sources: Sequence[Source]) -> list[dict[str, Any]]:
    """What identifies the stream: each input's name, cells, genes and (for files) size on disk."""
    out = []
    for s in sources:
        entry = {"name": s.name, "n_obs": int(s.n_obs), "n_vars": len(s.var_names)}
        if s.path is not None:
            entry["bytes"] = s.path.stat().st_size
        out.append(entry)
    return out


def comparable_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: repr(v) for k, v in params.items() if k not in NOT_COMPARED}


def write_checkpoint(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically: to a temporary file, fsync, rename over the previous checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        torch.save({"version": FORMAT_VERSION, **payload}, fh)
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
        # our own file, holding numpy arrays and the optimizer state: not restricted to weights
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any failure to unpickle means an unusable checkpoint
        raise InputError(f"{path}: cannot read the checkpoint ({e}).") from e
    if payload.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format {payload.get('version')} is not {FORMAT_VERSION}.")
    return payload


def check_same_run(
    payload: Mapping[str, Any], params: Mapping[str, Any], files: list[dict[str, Any]], where: Path
) -> None:
    """Refuse to resume a checkpoint made with other parameters or other files, saying which differ."""
    saved = payload["params"]
    now = comparable_params(params)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k} (checkpoint {saved.get(k)}, now {now.get(k)})" for k in diff[:8])
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
