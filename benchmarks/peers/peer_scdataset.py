"""scDataset peer (PyPI ``scdataset``): the files as one collection of backed AnnData, read by scDataset.

scDataset draws indices with its strategy (``Streaming()`` in order, ``BlockShuffling(block_size)``
shuffled), sorts each fetch of ``batch_size * fetch_factor`` indices, calls ``fetch_callback(collection,
indices)`` once per fetch, then cuts the fetch into shuffled batches; a torch ``DataLoader(batch_size=None,
num_workers, prefetch_factor)`` runs it, as its README shows. The files keep their own gene orders (an
AnnCollection would inner-join them and change the library sizes), so the collection is a plain list of
backed files and the callback reads and transforms per file.

settings:
  batch_size, fetch_factor, block_size (shuffled), num_workers, prefetch_factor (default fetch_factor + 1)
  fetch: "slices" (tuned: the sorted indices as contiguous runs, one ``X[start:stop]`` per run) or
         "fancy" (as in the README's AnnData example: ``X[indices]``, which anndata reads row by row)
"""

from __future__ import annotations

import json
import os

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from common import Features, parser, run
from scdataset import BlockShuffling, MultiIndexable, Streaming, scDataset
from torch.utils.data import DataLoader


class Files:
    """The files end to end, opened backed in the process that reads them (DataLoader workers fork)."""

    def __init__(self, paths, label_key, fs: Features):
        self.paths = list(paths)
        self.fs = fs
        self.label_key = label_key
        self._pid = None
        self._open()
        self.offsets = np.concatenate(([0], np.cumsum([a.n_obs for a in self.adatas])))

    def _open(self):
        self.adatas = [ad.read_h5ad(p, backed="r") for p in self.paths]
        self.maps = [self.fs.col_map(a.var_names) for a in self.adatas]
        self.labels = [a.obs[self.label_key].to_numpy() for a in self.adatas]
        self.names = [a.obs_names.to_numpy() for a in self.adatas]
        self._pid = os.getpid()

    def __len__(self):
        return int(self.offsets[-1])

    def fetch(self, indices, how):
        """Features, labels and names of the (sorted) global ``indices``."""
        if self._pid != os.getpid():
            self._open()
        indices = np.asarray(indices)
        X = np.empty((indices.size, self.fs.n_genes), np.float32)
        labels = np.empty(indices.size, dtype=object)
        names = np.empty(indices.size, dtype=object)
        file_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(file_of):
            sel = np.flatnonzero(file_of == f)
            rows = indices[sel] - self.offsets[f]
            x = self.adatas[f].X
            if how == "fancy":
                raw = x[rows]
            else:
                cuts = np.flatnonzero(np.diff(rows) != 1) + 1
                starts = np.concatenate(([0], cuts))
                stops = np.concatenate((cuts, [rows.size]))
                raw = sp.vstack([x[rows[a] : rows[b - 1] + 1] for a, b in zip(starts, stops, strict=True)], "csr")
            self.fs.transform(raw, self.maps[f], out=X[sel[0] : sel[-1] + 1])  # sel is a run: indices sorted
            labels[sel] = self.labels[f][rows]
            names[sel] = self.names[f][rows]
        return MultiIndexable(X=X, labels=labels, obs_names=names)


def main():
    args = parser(__doc__).parse_args()
    settings = {"batch_size": 64, "fetch_factor": 16, "block_size": 16, "num_workers": 0, "fetch": "slices"}
    settings.update(json.loads(args.settings))
    torch.set_num_threads(1)
    fs = Features(args.gene_space)
    files = Files(args.files, args.label_key, fs)
    strategy = Streaming() if args.order == "sequential" else BlockShuffling(block_size=settings["block_size"])
    how = settings["fetch"]
    dataset = scDataset(
        files, strategy, batch_size=settings["batch_size"], fetch_factor=settings["fetch_factor"],
        fetch_callback=lambda coll, idx: coll.fetch(idx, how),
    )  # fmt: skip
    workers = settings["num_workers"]
    extra = {"prefetch_factor": settings.get("prefetch_factor", settings["fetch_factor"] + 1)} if workers else {}
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, **extra)

    def epoch():
        for batch in loader:  # the DataLoader made X a tensor; the strings stay lists
            X = batch["X"]
            yield (X.numpy() if isinstance(X, torch.Tensor) else X), batch["labels"], batch["obs_names"]

    run(epoch, args, settings=settings)


if __name__ == "__main__":
    main()
