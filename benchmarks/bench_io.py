"""Chunk reading throughput and memory: raw h5py row blocks vs `pp.iter_chunks` (read + transform), and peers.

Writes (once, cached) a seeded stream of raw counts: 10 files x 10,000 cells x 20,000 genes,
~2,000 nonzeros per cell, every other file missing 2% of the genes in a shuffled order. Prints, in one run:
cells/s of a raw h5py row-block read, cells/s of iter_chunks to 2,000 genes, their ratio, and the peak RSS of
iterating 10 files vs 100 files (the same cells split 10 ways) and vs 100 files of
10x the cells (the 10 files linked 10 times each).

Then the loader peers on the same files, each in its own process and environment (benchmarks/peers/,
see benchmarks/README.md): plain anndata backed + numpy/scipy, scDataset and annbatch, all delivering the
same model-ready features with labels (checked against ``GeneSpace.transform`` on each run's first batch),
in file order and shuffled; a table of cells/s, best of 3, and the ratio of sccoreset to each.

    python benchmarks/bench_io.py [--cells-per-file 10000] [--chunk-size 10000] [--no-peers]
        [--peers-python .venv-peers/bin/python] [--annbatch-python .venv-annbatch/bin/python]
    python benchmarks/bench_io.py --quick     # small files, peers with two settings each: a smoke test
    python benchmarks/bench_io.py --peers-only    # only the loader table
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from _common import raw_read

import sccoreset as scc
from sccoreset._utils import h5ad_safe_strings

DATA = Path(__file__).parent / "_data"


def chunked_read(files, gs, chunk_size, label_key="cell_type", order="sequential", n_workers=None):
    n = 0
    t0 = time.perf_counter()
    for chunk in scc.pp.iter_chunks(
        files, gs, chunk_size=chunk_size, label_key=label_key, order=order, prefetch=1, n_workers=n_workers
    ):
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


ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
ORDERS = {"sequential": "sequential", "shuffled": "block_shuffle"}  # peers' order -> iter_chunks order


def _grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def peer_settings(quick):
    """README settings and the tuning grid of each peer, per order."""
    scd_readme = {"batch_size": 64, "fetch_factor": 8, "block_size": 16, "num_workers": 4, "prefetch_factor": 9}
    scd_readme["fetch"] = "fancy"  # the README's AnnData example: adata[indices].X
    annb_readme = {"batch_size": 4096, "chunk_size": 32, "preload_nchunks": 256}
    if quick:
        scd = {o: _grid(batch_size=[64], fetch_factor=[16, 256], block_size=[64], num_workers=[0]) for o in ORDERS}
        annb = [annb_readme, {"batch_size": 4096, "chunk_size": 512, "preload_nchunks": 32}]
        return {"scDataset": (scd_readme, scd), "annbatch": (annb_readme, dict.fromkeys(ORDERS, annb))}
    # block_size 4 left out: 4-row slices of backed files ran at ~0.4k cells/s
    scd = {
        "sequential": _grid(batch_size=[64], fetch_factor=[16, 256], block_size=[16], num_workers=[0, 1]),
        "shuffled": _grid(batch_size=[64], fetch_factor=[16, 64, 256], block_size=[64, 1024], num_workers=[0]),
    }
    annb = [annb_readme] + [
        {"batch_size": 4096, "chunk_size": c, "preload_nchunks": p} for c, p in [(512, 32), (256, 64), (1024, 16)]
    ]
    return {"scDataset": (scd_readme, scd), "annbatch": (annb_readme, dict.fromkeys(ORDERS, annb))}


class FirstBatchCheck:
    """Compares a peer's first batch with ``GeneSpace.transform`` of the same cells' raw counts."""

    def __init__(self, files, gs, label_key="cell_type"):
        import anndata as ad
        import pandas as pd

        self.files, self.gs, self.label_key = files, gs, label_key
        self.adatas = [ad.read_h5ad(f, backed="r") for f in files]
        self.n_cells = sum(a.n_obs for a in self.adatas)
        self.where = pd.concat(
            [pd.DataFrame({"file": f, "row": np.arange(a.n_obs)}, index=a.obs_names) for f, a in enumerate(self.adatas)]
        )

    def __call__(self, path, what):
        z = np.load(path, allow_pickle=False)
        X, labels, names = z["X"], z["labels"], z["obs_names"]
        loc = self.where.loc[names]
        expect = np.empty_like(X)
        expect_labels = np.empty(len(names), dtype=object)
        for f in np.unique(loc["file"]):
            sel = np.flatnonzero(loc["file"].to_numpy() == f)
            rows = loc["row"].to_numpy()[sel]
            a = self.adatas[f]
            order = np.argsort(rows)
            expect[sel[order]] = self.gs.transform(a.X[rows[order]], a.var_names)
            expect_labels[sel] = a.obs[self.label_key].to_numpy()[rows].astype(str)
        err = float(np.abs(X - expect).max())
        assert err <= 1e-4, f"{what}: first batch differs from GeneSpace.transform by {err:.2g}"
        assert (labels == expect_labels).all(), f"{what}: labels of the first batch differ"
        return err


def run_peer(python, script, files, gs_npz, order, settings, repeats, check, what, extra=()):
    """One peer run in its own process; returns its JSON result (cells/s best of ``repeats``) or None."""
    first = DATA / "peers" / "first_batch.npz"
    first.unlink(missing_ok=True)
    cmd = [
        python, str(PEERS / script), "--gene-space", str(gs_npz), "--order", order, "--settings",
        json.dumps(settings), "--repeats", str(repeats), "--first-batch", str(first), *extra, *files,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"  {what} {order} {settings}: failed\n    " + "\n    ".join(out.stderr.strip().splitlines()[-8:]))
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cells"] == check.n_cells, f"{what} {order}: {res['cells']} cells delivered of {check.n_cells}"
    res["max_abs_err"] = check(first, f"{what} {order} {settings}")
    return res


def tuned(python, script, files, gs_npz, order, grid, repeats, check, what, extra=()):
    """Every setting of ``grid`` once, then the fastest again best of ``repeats``."""
    trials = []
    for settings in grid:
        res = run_peer(python, script, files, gs_npz, order, settings, 1, check, what, extra)
        if res is not None:
            print(f"    tuning {what} {order} {settings}: {res['cells_per_s']:,.0f} cells/s")
            trials.append(res)
    if not trials:
        return None
    best = max(trials, key=lambda r: r["cells_per_s"])["settings"]
    return run_peer(python, script, files, gs_npz, order, best, repeats, check, what, extra)


def _described(res):
    return f"{json.dumps(res['settings'])}  (first batch vs GeneSpace.transform: max |diff| {res['max_abs_err']:.1e})"


def _has(python, module):
    ok = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return ok.returncode == 0


def compare_peers(files, gs, args):
    """sccoreset, a raw h5py read, and the peers in their own processes: cells/s of model-ready features."""
    print(f"\nloaders side by side ({gs.n_cells:,} cells, best of {args.repeats}; peers in their own processes)")
    (DATA / "peers").mkdir(exist_ok=True)
    tag = "quick" if args.quick else "full"
    gs_npz = DATA / "peers" / f"gene_space_{tag}.npz"
    np.savez(gs_npz, genes=np.asarray(gs.genes, dtype=str), mean=gs.mean, std=gs.std,
             target_sum=gs.target_sum, max_value=gs.max_value)  # fmt: skip
    rows = []  # (loader, order, cells/s, settings)
    for order, ours in ORDERS.items():
        rate = max(chunked_read(files, gs, args.chunk_size, order=ours)[0] for _ in range(args.repeats))
        setting = f"iter_chunks(chunk_size={args.chunk_size}, order={ours!r}, prefetch=1)"
        rows.append(("sccoreset", order, rate, setting))
    rows.append(("raw h5py read, no transform", "sequential", max(raw_read(files, args.chunk_size) for _ in range(args.repeats)), f"row blocks of {args.chunk_size}"))  # fmt: skip
    check = FirstBatchCheck(files, gs)
    conversion = None
    py = args.peers_python
    if not args.peers:
        pass
    elif not (py and Path(py).exists()):
        print(f"  peers skipped: no peers interpreter at {py!r} (make one: see benchmarks/README.md)")
    else:
        base = {"chunk_size": args.chunk_size, "block_size": min(args.chunk_size // 8, 1024)}
        for order in ORDERS:
            res = run_peer(py, "peer_anndata.py", files, gs_npz, order, base, args.repeats, check, "anndata")
            if res:
                rows.append(("anndata backed + numpy", order, res["cells_per_s"], _described(res)))
        readme, grids = peer_settings(args.quick)["scDataset"]
        if not _has(py, "scdataset"):
            print(f"  scDataset skipped: `import scdataset` fails in {py}")
        else:
            for order in ORDERS:
                # one pass: the README's row-by-row reads are slow
                res = run_peer(py, "peer_scdataset.py", files, gs_npz, order, readme, 1, check, "scDataset")
                if res:
                    rows.append(("scDataset, README (1 pass)", order, res["cells_per_s"], _described(res)))
                res = tuned(py, "peer_scdataset.py", files, gs_npz, order, grids[order], args.repeats, check, "scDataset")  # fmt: skip
                if res:
                    rows.append(("scDataset, tuned", order, res["cells_per_s"], _described(res)))
        apy = args.annbatch_python or py
        if not (Path(apy).exists() and _has(apy, "annbatch")):
            print(f"  annbatch skipped: `import annbatch` fails in {apy} (annbatch needs Python >= 3.12)")
        else:
            store = DATA / "peers" / f"annbatch_{tag}.zarr"
            out = subprocess.run(
                [apy, str(PEERS / "peer_annbatch.py"), "--convert", str(store), *files],
                capture_output=True, text=True, cwd=ROOT,
            )  # fmt: skip
            if out.returncode != 0:
                print("  annbatch conversion failed:\n    " + "\n    ".join(out.stderr.strip().splitlines()[-8:]))
            else:
                conversion = json.loads(out.stdout.strip().splitlines()[-1])
                readme, grids = peer_settings(args.quick)["annbatch"]
                extra = ("--collection", str(store))
                for order in ORDERS:
                    res = run_peer(apy, "peer_annbatch.py", files, gs_npz, order, readme, args.repeats, check, "annbatch", extra)  # fmt: skip
                    if res:
                        rows.append(("annbatch, README settings", order, res["cells_per_s"], _described(res)))  # fmt: skip
                    res = tuned(apy, "peer_annbatch.py", files, gs_npz, order, grids[order], args.repeats, check, "annbatch", extra)  # fmt: skip
                    if res:
                        rows.append(("annbatch, tuned", order, res["cells_per_s"], _described(res)))

    ours = {o: r for name, o, r, _ in rows if name == "sccoreset"}
    print(f"\n| {'loader':<30} | {'order':<10} | {'cells/s':>9} | sccoreset / it |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 11}|{'-' * 16}|")
    for name, order, rate, _ in rows:
        ratio = ours[order] / rate if order in ours else float("nan")
        print(f"| {name:<30} | {order:<10} | {rate:>9,.0f} | {ratio:>14.2f} |")
    if conversion:
        print(
            f"annbatch conversion to its sharded zarr collection: {conversion['seconds']:.1f} s, "
            f"{conversion['bytes'] / 1e9:.2f} GB on disk (the .h5ad files: {sum(os.path.getsize(f) for f in files) / 1e9:.2f} GB)"
        )
    print("settings:")
    for name, order, _, setting in rows:
        print(f"  {name}, {order}: {setting}")
    for order in ORDERS:
        peers = [r for name, o, r, _ in rows if o == order and name.split(",")[0] in ("scDataset", "annbatch")]
        if peers:
            ratio = ours[order] / max(peers)
            verdict = "meets" if ratio >= 1.5 else "misses"
            print(f"bar, {order}: sccoreset / best of scDataset and annbatch = {ratio:.2f} ({verdict} the 1.5x bar)")


def _split(files, parts, out_dir):
    """Each file split into ``parts`` files of consecutive rows (written once, cached)."""
    import anndata as ad

    out_dir.mkdir(exist_ok=True)
    split = []
    for f in files:
        a = None
        for part in range(parts):
            out = out_dir / f"{Path(f).stem}_part{part}.h5ad"
            if not out.exists():
                a = ad.read_h5ad(f) if a is None else a
                n = a.n_obs // parts
                piece = a[part * n : (part + 1) * n].copy()
                piece.obs, piece.var = h5ad_safe_strings(piece.obs), h5ad_safe_strings(piece.var)  # pandas 3 strings
                piece.write_h5ad(out)
            split.append(str(out))
    return split


def parallel_figures(files, gs, args):
    """Issue 9: iter_chunks with 1-8 reading threads, fit_gene_space, and many small files vs few large ones."""
    from sccoreset._io._parallel import default_workers

    cpus = len(os.sched_getaffinity(0))
    reps = 1 if args.quick else 3
    # the file list read 4 times (40 chunks): with 10 chunks the first 8 start together and the pipeline of
    # 8 threads never fills, which understates how they scale
    passes = 1 if args.quick else 4
    print(
        f"\nreading with several threads ({cpus} CPUs usable, default n_workers={default_workers()}; "
        f"the files read {passes} times over; best of {reps}):"
    )
    raw = max(raw_read(files * passes, args.chunk_size) for _ in range(reps))
    print(f"  raw h5py row-block read, one thread:  {raw:,.0f} cells/s")
    rates = {}
    for w in (1, 2, 4, 8):
        rates[w] = max(chunked_read(files * passes, gs, args.chunk_size, n_workers=w)[0] for _ in range(reps))
        print(f"  iter_chunks n_workers={w}:            {rates[w]:,.0f} cells/s  ({rates[w] / raw:.2f} x raw read)")
    print(
        f"  bar (16-core box): n_workers=8 / n_workers=1 = {rates[8] / rates[1]:.2f} (>= 3), "
        f"n_workers=8 / raw read = {rates[8] / raw:.2f} (>= 2)"
    )
    for w in (1, None):
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            fitted = scc.pp.fit_gene_space(files, n_top_genes=2000, n_workers=w)
            best = max(best, fitted.n_cells / (time.perf_counter() - t0))
        same = np.array_equal(fitted.genes, gs.genes)
        print(f"  fit_gene_space n_workers={w or default_workers()}: {best:,.0f} cells/s (same genes as above: {same})")
    parts = 10
    split = _split(files, parts, DATA / ("io_split_quick" if args.quick else "io_split"))
    many = max(chunked_read(split, gs, args.chunk_size)[0] for _ in range(reps))
    few = max(chunked_read(files, gs, args.chunk_size)[0] for _ in range(reps))
    print(
        f"  {len(files)} files x {args.cells_per_file:,} cells: {few:,.0f} cells/s; {len(split)} files x "
        f"{args.cells_per_file // parts:,} cells: {many:,.0f} cells/s (ratio {many / few:.2f}; bar >= 0.8)"
    )


def _venv_python(name):
    path = ROOT / name / "bin" / "python"
    return str(path) if path.exists() else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cells-per-file", type=int, default=10_000)
    p.add_argument("--n-files", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--rss-child", nargs="+")
    p.add_argument("--repeats", type=int, default=3, help="best of this many passes in the loader table")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="run the loader peers")
    p.add_argument("--peers-python", default=_venv_python(".venv-peers"), help="interpreter with scdataset")
    p.add_argument(
        "--annbatch-python", default=_venv_python(".venv-annbatch"), help="interpreter with annbatch (Python >= 3.12)"
    )
    p.add_argument("--quick", action="store_true", help="small files, two settings per peer: a smoke test")
    p.add_argument("--peers-only", action="store_true", help="only the loader table (no RSS and long-stream runs)")
    p.add_argument("--parallel-only", action="store_true", help="only the reading-threads figures (issue 9)")
    args = p.parse_args()
    if args.quick:
        args.n_files, args.cells_per_file, args.chunk_size = 3, 2000, 2000
    if args.rss_child:
        gs_path, *files = args.rss_child
        rss_child(files, gs_path, args.chunk_size)
        return

    import anndata as ad

    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(
        DATA / ("io_quick" if args.quick else "io"),
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
    if not args.peers_only:
        parallel_figures(files, gs, args)
    if args.parallel_only:
        return
    if args.quick or args.peers_only:
        compare_peers(files, gs, args)
        return
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
    split = _split(files, 10, DATA / "io_split")
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
    compare_peers(files, gs, args)


if __name__ == "__main__":
    main()
