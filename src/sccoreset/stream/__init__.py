"""Stages over the event stream of a run: ``pipe``, ``augment``, ``tap``, ``take``, ``early_stop``, ``collect``."""

from ._augmenters import param_norm, validation
from ._stages import augment, collect, collect_jsonl, early_stop, pipe, take, tap

__all__ = ["augment", "collect", "collect_jsonl", "early_stop", "param_norm", "pipe", "take", "tap", "validation"]
