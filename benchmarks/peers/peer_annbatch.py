"""annbatch peer (PyPI ``annbatch``, needs Python >= 3.12): a sharded zarr collection read by ``annbatch.Loader``.

``--convert STORE FILES...``: ``DatasetCollection(STORE).add_adatas(FILES)`` as its README shows (shuffled while
written, var outer-joined so a file's missing genes are zeros and library sizes stay the same); prints the
seconds and the bytes on disk.

Otherwise (``--collection STORE``): ``Loader(batch_size, chunk_size, preload_nchunks, shuffle)`` over the
collection with the zarrs codec pipeline (the README: "necessary for local filesystem performance"), obs
restricted to the label column; each yielded CSR batch goes through the numpy/scipy transform of common.py.
sequential is the store's order (already shuffled once by the conversion), shuffled is ``shuffle=True``.

settings: batch_size, chunk_size, preload_nchunks (README: 4096, 32, 256; the Loader's defaults: 512, 32)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import zarr
from common import Features, parser, run

zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def convert(store: str, files: list[str]) -> None:
    from annbatch import DatasetCollection

    if os.path.exists(store):
        shutil.rmtree(store)
    t0 = time.perf_counter()
    DatasetCollection(store).add_adatas(adata_paths=files, shuffle=True, rng=np.random.default_rng(0))
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "bytes": size}))


def main():
    if sys.argv[1:2] == ["--convert"]:
        convert(sys.argv[2], sys.argv[3:])
        return
    p = parser(__doc__)
    p.add_argument("--collection", required=True)
    args = p.parse_args()
    from annbatch import DatasetCollection, Loader

    settings = {"batch_size": 4096, "chunk_size": 32, "preload_nchunks": 256, **json.loads(args.settings)}
    fs = Features(args.gene_space)
    key = args.label_key

    def load(g: zarr.Group) -> ad.AnnData:  # X backed, obs only the labels (the README's custom load function)
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=ad.io.read_elem(g["obs"])[[key]])

    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(shuffle=args.order == "shuffled", rng=np.random.default_rng(0), **settings)
        loader.use_collection(DatasetCollection(args.collection), load_adata=load)
    first = next(iter(DatasetCollection(args.collection)))
    cmap = fs.col_map(ad.io.read_elem(first["var"]).index)

    def epoch():
        for batch in loader:
            obs = batch["obs"]
            yield fs.transform(batch["X"], cmap), obs[key].to_numpy(), obs.index.to_numpy()

    run(epoch, args, settings=settings)


if __name__ == "__main__":
    main()
