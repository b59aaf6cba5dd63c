"""Find the record that `stream_train` left in a coreset's ``uns`` (under ``key_added``, default "sccoreset")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anndata import AnnData

from .._errors import InputError

_RECORD_KEYS = ("gene_space", "model", "classes", "history")


def is_record(value: Any) -> bool:
    return isinstance(value, Mapping) and all(k in value for k in _RECORD_KEYS)


def find_record(coreset: AnnData, key: str | None = None) -> dict[str, Any]:
    """``coreset.uns[key]``; without ``key``, ``uns["sccoreset"]`` or else the only stream_train record in uns."""
    if key is not None:
        if not is_record(coreset.uns.get(key)):
            raise InputError(f"coreset: uns[{key!r}] is not a record written by sccoreset.tl.stream_train.")
        return coreset.uns[key]
    if is_record(coreset.uns.get("sccoreset")):
        return coreset.uns["sccoreset"]
    found = [k for k, v in coreset.uns.items() if is_record(v)]
    if len(found) == 1:
        return coreset.uns[found[0]]
    if found:
        raise InputError(f"coreset: uns holds several stream_train records {found}; choose one with its key.")
    raise InputError("coreset: no stream_train record in uns; pass the AnnData returned by sccoreset.tl.stream_train.")
