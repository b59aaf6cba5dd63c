"""Small helpers shared by the namespaces."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

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


def h5ad_safe_strings(df: pd.DataFrame) -> pd.DataFrame:
    """Index, string columns and categories as object dtype, which every anndata version writes.

    pandas 3 infers a string dtype that anndata (< 0.13) refuses to write unless a global setting is
    changed; the coreset and generated files must write anywhere.
    """
    df = df.copy()
    df.index = pd.Index(np.asarray(df.index, dtype=object), dtype=object, name=df.index.name)
    for col in df.columns:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            if s.cat.categories.dtype != object and s.cat.categories.dtype.kind not in "biuf":
                df[col] = s.cat.rename_categories(pd.Index(np.asarray(s.cat.categories, dtype=object), dtype=object))
        elif pd.api.types.is_string_dtype(s.dtype) and s.dtype != object:
            df[col] = s.astype(object)
    return df
