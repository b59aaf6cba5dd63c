"""Chunk reading throughput and memory: raw h5py row blocks vs `pp.iter_chunks` (read + transform).

Writes (once, cached) a seeded stream of raw counts: 10 files x 10,000 cells x 20,000 genes,
~2,000 nonzeros per cell, every other file missing 2% of the genes in a shuffled order. Prints, in one run:
cells/s of a raw h5py row-block read, cells/s of iter_chunks to 2,000 genes, their ratio, and the peak RSS of
iterating 10 files vs 100 files (the same cells split 10 ways) and vs 100 files of
10x the cells (the 10 files linked 10 times each).

    python benchmarks/bench_io.py [--cells-per-file 10000] [--chunk-size 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

import sccoreset as scc

DATA = Path(__file__).parent / "_data"


def raw_read(files, chunk_size):
    """Cells/s of reading every row block's indptr, indices and data straight from the CSR arrays."""
    n = 0
    t0 = time.perf_counter()
    for path in files:
        with h5py.File(path, "r") as f:
            x = f["X"]
            total = x["indptr"].shape[0] - 1
            for start in range(0, total, chunk_size):
                stop = min(start + chunk_size, total)
                ptr = x["indptr"][start : stop + 1]
                x["data"][ptr[0] : ptr[-1]]
                x["indices"][ptr[0] : ptr[-1]]
                n += stop - start
    return n / (time.perf_counter() - t0)


def chunked_read(files, gs, chunk_size, label_key="cell_type"):
    n = 0
    t0 = time.perf_counter()
    for chunk in scc.pp.iter_chunks(files, gs, chunk_size=chunk_size, label_key=label_key, prefetch=1):
        n += len(chunk)
    return n / (time.perf_counter() - t0), n


def compare_throughput(title, files, gs, chunk_size, repeats):
    """Raw read and iter_chunks alternated (a noisy neighbour slows both alike): medians and the median ratio."""
    pairs = [(raw_read(files, chunk_size), chunked_read(files, gs, chunk_size)[0]) for _ in range(repeats)]
    raw, ours = np.median(pairs, axis=0)
    print(title)
    print(f"  raw h5py row-block read:         {raw:,.0f} cells/s")
    print(
        f"  iter_chunks (read + transform):  {ours:,.0f} cells/s   (best of {repeats}: {max(p[1] for p in pairs):,.0f})"
    )
    print(f"  ratio iter_chunks / raw read:    {np.median([o / r for r, o in pairs]):.2f}")


def rss_child(files, gs_path, chunk_size):
    """Run in a subprocess: scan + iterate, report peak RSS (MiB)."""
    import anndata as ad

    gs = scc.pp.GeneSpace.from_dict(ad.read_h5ad(gs_path).uns["gene_space"])
    scc.pp.scan(files, "cell_type")
    rate, n = chunked_read(files, gs, chunk_size)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    print(json.dumps({"peak_rss_mib": peak, "cells": n, "cells_per_s": rate}))


def _linked(files):
    """The files linked 10 times each under other names: 10x the files and cells, same bytes on disk."""
    many = DATA / "io_links"
    many.mkdir(exist_ok=True)
    linked = []
    for rep in range(10):
        for f in files:
            link = many / f"rep{rep}_{Path(f).name}"
            if not link.exists():
                os.symlink(os.path.abspath(f), link)
            linked.append(str(link))
    return linked


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cells-per-file", type=int, default=10_000)
    p.add_argument("--n-files", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--rss-child", nargs="+")
    args = p.parse_args()
    if args.rss_child:
        gs_path, *files = args.rss_child
        rss_child(files, gs_path, args.chunk_size)
        return

    import anndata as ad

    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(
        DATA / "io",
        n_files=args.n_files,
        cells_per_file=args.cells_per_file,
        n_genes=20_000,
        holdout_per_type=10,
        library_size=3000.0,
    )
    files = [str(f) for f in stream.files]
    print(
        f"stream: {len(files)} files x {args.cells_per_file} cells x 20,000 genes (ready in {time.perf_counter() - t0:.0f} s)"
    )
    with h5py.File(files[0]) as f:
        nnz = np.diff(f["X/indptr"][:]).mean()
    print(f"nonzeros per cell: {nnz:.0f}")

    t0 = time.perf_counter()
    gs = scc.pp.fit_gene_space(files, n_top_genes=2000)
    n_cells = gs.n_cells
    print(f"fit_gene_space (one pass, 2,000 HVGs): {n_cells / (time.perf_counter() - t0):,.0f} cells/s")

    raw_read(files, args.chunk_size)  # warm the page cache and numba
    chunked_read(files[:1], gs, args.chunk_size)
    compare_throughput(
        "one pass over the 10 files (100,000 cells; opening the files and the first, unoverlapped chunk included):",
        files, gs, args.chunk_size, repeats=5,
    )  # fmt: skip
    compare_throughput(
        "a long stream: the 10 files linked 10 times (100 files, 1,000,000 cells):",
        _linked(files), gs, args.chunk_size, repeats=2,
    )  # fmt: skip

    gs_path = DATA / "io_gene_space.h5ad"
    adata = ad.AnnData(np.zeros((1, 1), np.float32))
    adata.uns["gene_space"] = gs.to_dict()
    adata.write_h5ad(gs_path)
    # the same 100,000 cells split into 100 files, and the 10 files linked 10 times (1,000,000 cells)
    split_dir = DATA / "io_split"
    split_dir.mkdir(exist_ok=True)
    split = []
    for f in files:
        a = None
        for part in range(10):
            out = split_dir / f"{Path(f).stem}_part{part}.h5ad"
            if not out.exists():
                a = ad.read_h5ad(f) if a is None else a
                n = a.n_obs // 10
                a[part * n : (part + 1) * n].copy().write_h5ad(out)
            split.append(str(out))
    peaks = {}
    runs = [("10 files", files), ("100 files", split), ("100 files, 10x cells", _linked(files))]
    for label, fs in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--chunk-size", str(args.chunk_size), "--rss-child", str(gs_path), *fs],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[label] = res["peak_rss_mib"]
        print(
            f"peak RSS {label:>20}: {res['peak_rss_mib']:6.0f} MiB ({res['cells']:,} cells, {res['cells_per_s']:,.0f} cells/s)"
        )
    print(f"peak RSS growth, 10x files (same cells): {100 * (peaks['100 files'] / peaks['10 files'] - 1):+.1f}%")
    print(
        f"peak RSS growth, 10x files and cells:    {100 * (peaks['100 files, 10x cells'] / peaks['10 files'] - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
