"""Metadata pass over the stream: cells, genes and labels of every file, never reading X."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._errors import InputError
from .._io._labels import MissingLabels, check_policy, missing_labels_error, warn_missing_labels
from .._io._open_files import each_bounded
from .._io._sources import Source, open_sources


@dataclass
class StreamInfo:
    """What :func:`scan` found.

    Attributes
    ----------
    files
        Display name of each input (its path, or ``AnnData #i``).
    n_obs
        Cells per file.
    genes
        Union of gene names, in order of first appearance.
    genes_per_file
        Number of genes of each file.
    label_counts
        Files × labels table of cell counts (empty when no ``label_key`` was given); cells with a
        missing label are not counted.
    n_missing
        Cells per file whose label is missing (NaN/None); they are left out of the stream.
    """

    files: list[str]
    n_obs: np.ndarray
    genes: pd.Index
    genes_per_file: np.ndarray
    label_counts: pd.DataFrame
    n_missing: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.n_missing is None:
            self.n_missing = np.zeros(len(self.files), dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return int(self.n_obs.sum())

    @property
    def labels(self) -> list[str]:
        """All labels seen, sorted."""
        return list(self.label_counts.columns)

    def summary(self) -> pd.DataFrame:
        """One row per file: cells, genes and (if labels were scanned) the number of distinct labels."""
        df = pd.DataFrame({"n_obs": self.n_obs, "n_genes": self.genes_per_file}, index=self.files)
        if not self.label_counts.empty:
            df["n_labels"] = (self.label_counts.to_numpy() > 0).sum(1)
        if self.n_missing.any():
            df["n_missing"] = self.n_missing
        return df


def gene_union(sources: Sequence[Source]) -> pd.Index:
    """Union of the gene names of all sources, in order of first appearance.

    Files with the same gene list share one Index object (``SharedIndexes``): each distinct list is merged
    once (a thousand files of 20,000 genes took 4 ms each before).
    """
    distinct = list({id(s.var_names): s.var_names for s in sources}.values())
    if len(distinct) == 1 and distinct[0].is_unique:
        return pd.Index(distinct[0], dtype=object)
    seen: dict[str, None] = {}
    for names in distinct:
        seen.update(dict.fromkeys(names))
    return pd.Index(list(seen), dtype=object)


def scan_sources(
    sources: Sequence[Source],
    label_key: str | None,
    classes: Sequence[str] | None = None,
    *,
    missing_labels: MissingLabels = "skip",
) -> StreamInfo:
    """:func:`scan` on already opened sources (the caller closes them)."""
    check_policy(missing_labels)
    counts = []
    n_missing = np.zeros(len(sources), dtype=np.int64)
    for i, s in enumerate(each_bounded(sources)):
        if label_key is None:
            continue
        values, missing = s.read_labels(label_key)
        if missing.any():
            if missing_labels == "error":
                raise missing_labels_error(s, label_key, missing, s.physical_rows())
            n_missing[i] = int(missing.sum())
            values = values[~missing]
        vc = pd.Series(values, dtype=object).value_counts()
        if classes is not None:
            unknown = sorted(set(vc.index) - set(map(str, classes)))
            if unknown:
                raise InputError(
                    f"{s.name}: obs[{label_key!r}] holds labels not in the given label set: {unknown[:10]}."
                )
        counts.append(vc.rename(s.name))
    if label_key is not None:
        warn_missing_labels(sources, label_key, n_missing, stacklevel=4)
    if counts:
        table = pd.concat(counts, axis=1).T.fillna(0).astype(np.int64)
        table = table.reindex(columns=sorted(table.columns))
    else:
        table = pd.DataFrame(index=[s.name for s in sources])
    table.index = [s.name for s in sources]
    return StreamInfo(
        files=[s.name for s in sources],
        n_obs=np.array([s.n_obs for s in sources], dtype=np.int64),
        genes=gene_union(sources),
        genes_per_file=np.array([len(s.var_names) for s in sources], dtype=np.int64),
        label_counts=table,
        n_missing=n_missing,
    )


def scan(
    files: Sequence[Any] | Any,
    label_key: str | None = None,
    *,
    mod: str | None = None,
    layer: str | None = None,
    missing_labels: MissingLabels = "skip",
) -> StreamInfo:
    """Read the metadata of every input (obs label column, var names), never X.

    Parameters
    ----------
    files
        Paths to ``.h5ad`` / ``.h5mu`` files, or AnnData / MuData objects (in memory or backed).
    label_key
        obs column holding the labels to count per file.
    mod
        Modality to read from MuData inputs (e.g. ``"rna"``).
    layer
        Check that every input has ``layers[layer]``, the counts the stream will read instead of ``X``.
    missing_labels
        Cells whose label is missing (NaN/None): ``"skip"`` leaves them out of the counts with a
        :class:`~sccoreset._io._labels.MissingLabelsWarning` counting them per file (see
        :attr:`StreamInfo.n_missing`); ``"error"`` raises an :class:`~sccoreset.InputError` naming the
        file, the column, the number of such cells and the first one's row.

    Returns
    -------
    A :class:`StreamInfo` with cells per file, the gene union and label counts per file.

    Examples
    --------
    >>> info = sccoreset.pp.scan(["plate1.h5ad", "plate2.h5ad"], "cell_type")  # doctest: +SKIP
    >>> info.label_counts  # doctest: +SKIP
    """
    with open_sources(files, mod=mod, layer=layer) as sources:
        return scan_sources(sources, label_key, missing_labels=missing_labels)
