"""Stages over a stream of events (plain dicts): enrich, filter, stop and sink them. No AnnData here.

A stage is a function from an iterable of events to an iterator of events; :func:`pipe` applies stages in
order. The events of :func:`sccoreset.tl.stream_events` carry the model under ``"model"``; sinks leave it out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._errors import InputError

Event = dict[str, Any]
Stage = Callable[[Iterable[Event]], Iterator[Event]]
HEAVY_KEYS = ("model",)


def pipe(stream: Iterable[Event], *stages: Stage) -> Iterator[Event]:
    """``stream`` passed through ``stages`` in order: ``pipe(events, augment(f), take(10))``."""
    out: Iterable[Event] = stream
    for stage in stages:
        if not callable(stage):
            raise InputError(f"pipe: a stage must be callable, got {type(stage).__name__}.")
        out = stage(out)
    return iter(out)


def augment(fn: Callable[[Event], Mapping[str, Any] | None]) -> Stage:
    """Add the items ``fn(event)`` returns to every event (``None``: add nothing)."""

    def stage(stream: Iterable[Event]) -> Iterator[Event]:
        for event in stream:
            extra = fn(event)
            yield {**event, **extra} if extra else event

    return stage


def tap(fn: Callable[[Event], Any], *, every: int = 1) -> Stage:
    """Call ``fn(event)`` for its side effect (logging, saving) on every ``every``-th event; events pass unchanged."""
    if every < 1:
        raise InputError(f"tap: every must be positive, got {every}.")

    def stage(stream: Iterable[Event]) -> Iterator[Event]:
        for i, event in enumerate(stream):
            if i % every == 0:
                fn(event)
            yield event

    return stage


def take(n: int) -> Stage:
    """The first ``n`` events, then stop (the upstream run stops reading)."""
    if n < 0:
        raise InputError(f"take: n must be non-negative, got {n}.")

    def stage(stream: Iterable[Event]) -> Iterator[Event]:
        if n == 0:
            return
        for i, event in enumerate(stream, start=1):
            yield event
            if i >= n:
                return

    return stage


def early_stop(key: str, *, patience: int, min_delta: float = 0.0, mode: Literal["max", "min"] = "max") -> Stage:
    """Stop after ``patience`` events in a row in which ``event[key]`` did not improve by more than ``min_delta``.

    Events without ``key`` (e.g. the final consolidation's) pass through and do not count. The event that
    triggers the stop is yielded, with ``"early_stop": True`` added.
    """
    if patience < 1:
        raise InputError(f"early_stop: patience must be positive, got {patience}.")
    if mode not in ("max", "min"):
        raise InputError(f"early_stop: mode must be 'max' or 'min', got {mode!r}.")
    sign = 1.0 if mode == "max" else -1.0

    def stage(stream: Iterable[Event]) -> Iterator[Event]:
        best, waited = -math.inf, 0
        for event in stream:
            if key not in event:
                yield event
                continue
            value = sign * float(event[key])
            if value > best + min_delta:
                best, waited = value, 0
            else:
                waited += 1
            if waited >= patience:
                yield {**event, "early_stop": True}
                return
            yield event

    return stage


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def collect(stream: Iterable[Event], *, keep_heavy: bool = False) -> list[Event]:
    """All events in a list (without the ``"model"`` reference unless ``keep_heavy``)."""
    if keep_heavy:
        return list(stream)
    return [{k: v for k, v in e.items() if k not in HEAVY_KEYS} for e in stream]


def collect_jsonl(stream: Iterable[Event], path: str | os.PathLike) -> int:
    """Write every event as one JSON line to ``path`` (arrays as lists, the model left out); the number written.

    The file is written as the events arrive, so a run stopped half-way leaves the events it reached.
    """
    path = Path(path)
    n = 0
    with open(path, "w") as fh:
        for event in stream:
            fh.write(json.dumps(_plain({k: v for k, v in event.items() if k not in HEAVY_KEYS})) + "\n")
            fh.flush()
            n += 1
    return n
