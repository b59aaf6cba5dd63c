"""Baseline peer: ``anndata.read_h5ad(backed="r")`` row slicing + the numpy/scipy transform of common.py.

sequential: each file in row blocks of ``chunk_size`` (one slice ``adata.X[start:stop]`` each).
shuffled: the cells cut into blocks of ``block_size`` rows (within files), the blocks shuffled over all files
and dealt into chunks of ``chunk_size`` (what ``iter_chunks(order="block_shuffle")`` does), one slice per block.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
from common import Features, parser, run


def main():
    args = parser(__doc__).parse_args()
    settings = {"chunk_size": 10_000, "block_size": 1024, **json.loads(args.settings)}
    chunk, block = settings["chunk_size"], settings["block_size"]
    fs = Features(args.gene_space)
    adatas = [ad.read_h5ad(f, backed="r") for f in args.files]
    maps = [fs.col_map(a.var_names) for a in adatas]
    labels = [a.obs[args.label_key].to_numpy() for a in adatas]
    names = [a.obs_names.to_numpy() for a in adatas]
    rng = np.random.default_rng(0)

    def sequential():
        for a, cmap, lab, nm in zip(adatas, maps, labels, names, strict=True):
            for start in range(0, a.n_obs, chunk):
                stop = min(start + chunk, a.n_obs)
                yield fs.transform(a.X[start:stop], cmap), lab[start:stop], nm[start:stop]

    def shuffled():
        blocks = [(f, s, min(s + block, a.n_obs)) for f, a in enumerate(adatas) for s in range(0, a.n_obs, block)]
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        batch, size = [], 0
        for b in blocks + [None]:
            if b is not None:
                batch.append(b)
                size += b[2] - b[1]
            if size >= chunk or (b is None and batch):
                out = np.empty((size, fs.n_genes), np.float32)
                pos = 0
                for f, s, e in batch:
                    fs.transform(adatas[f].X[s:e], maps[f], out=out[pos : pos + e - s])
                    pos += e - s
                yield (
                    out,
                    np.concatenate([labels[f][s:e] for f, s, e in batch]),
                    np.concatenate([names[f][s:e] for f, s, e in batch]),
                )
                batch, size = [], 0

    run(sequential if args.order == "sequential" else shuffled, args, settings=settings)


if __name__ == "__main__":
    main()
