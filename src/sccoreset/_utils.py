"""Small helpers shared by the namespaces."""

from __future__ import annotations

import logging

import numpy as np

from ._errors import InputError

logger = logging.getLogger("sccoreset")

RandomState = int | np.random.Generator | None


def as_rng(random_state: RandomState) -> np.random.Generator:
    """One numpy Generator from an int seed, a Generator (used as is) or None (fresh entropy)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def check_positive(**params: float | None) -> None:
    """Raise an error naming the parameter if a given value is not a positive number."""
    for name, value in params.items():
        if value is not None and not (isinstance(value, int | float | np.integer | np.floating) and value > 0):
            raise InputError(f"{name} must be positive, got {value!r}.")
