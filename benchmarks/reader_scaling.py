"""How the chunk reader scales with threads (issue 9), by part: whole chunks through ``iter_chunks``, reading
alone (positioned reads of CSR rows, labels) and transforming alone (the numba kernel), each in 1..N threads.

    python benchmarks/reader_scaling.py                       # 10 files x 10,000 cells x 20,000 genes, 4 passes
    python benchmarks/reader_scaling.py --workers 1 2 4 8 16

A part that scales where the whole does not points at what serialises the whole (the GIL-holding h5py
calls, the ordering of the output, memory allocation); a part that does not scale alone is bound by memory
bandwidth or by a lock inside it.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
from _common import raw_read

import sccoreset as scc
from sccoreset._io._sources import ReadBuffers, open_sources
from sccoreset.pp._chunks import ChunkReader

DATA = Path(__file__).parent / "_data"


def in_threads(n_threads, jobs, fn):
    """``fn(job, state)`` for every job, spread over ``n_threads`` threads; wall seconds."""
    todo = list(jobs)
    lock = threading.Lock()

    def work():
        state = ReadBuffers()
        while True:
            with lock:
                if not todo:
                    return
                job = todo.pop(0)
            fn(job, state)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--cells-per-file", type=int, default=10_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--passes", type=int, default=4, help="the file list repeated: chunks = files x passes")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--data-dir", default=str(DATA))
    args = p.parse_args()
    st = scc.datasets.synthetic_stream(
        Path(args.data_dir) / f"scaling_{args.files}x{args.cells_per_file}x{args.genes}",
        n_files=args.files, cells_per_file=args.cells_per_file, n_genes=args.genes, random_state=0,
    )  # fmt: skip
    files = list(st.files) * args.passes
    gs = scc.pp.fit_gene_space(st.files, n_top_genes=2000)
    n_cells = args.cells_per_file * len(files)
    print(f"{len(files)} chunks of {args.cells_per_file:,} cells x {args.genes:,} genes ({n_cells:,} cells)")
    with open_sources(files) as sources:
        reader = ChunkReader(sources, gs, st.label_key, obs_names=False)
        plan = [[(f, 0, sources[f].n_obs)] for f in range(len(sources))]
        for f in range(len(sources)):
            reader.col_map(f)
        reader.read(0, plan[0])  # numba compiled, the first file opened

        raws = [reader.read_raw(i, plan[i], ReadBuffers()) for i in range(min(len(plan), max(args.workers)))]
        print(f"{'threads':>8} {'iter_chunks':>14} {'read s/chunk':>13} {'transform s/chunk':>18}"
              f" {'read alone':>14} {'transform alone':>16}")  # fmt: skip
        base = {}
        wholes = {}
        for w in args.workers:
            reader.n_workers = w
            t0 = time.perf_counter()
            rs, ts = [], []
            for chunk in reader.iterate(plan, prefetch=1):
                rs.append(chunk.read_seconds)
                ts.append(chunk.transform_seconds)
            whole = n_cells / (time.perf_counter() - t0)
            read_alone = n_cells / in_threads(w, range(len(plan)), lambda i, b: reader.read_raw(i, plan[i], b))
            # each thread transforms chunks already read (as many transforms as chunks)
            tr_alone = n_cells / in_threads(
                w, range(len(plan)), lambda i, b: reader.transform(raws[i % len(raws)], parallel=False)
            )
            wholes[w] = whole
            base.setdefault("whole", whole)
            base.setdefault("read", read_alone)
            base.setdefault("tr", tr_alone)
            print(
                f"{w:>8} {whole:>10,.0f} ({whole / base['whole']:.1f}x) {np.mean(rs):>9.3f} {np.mean(ts):>14.3f}"
                f" {read_alone:>10,.0f} ({read_alone / base['read']:.1f}x) {tr_alone:>10,.0f} ({tr_alone / base['tr']:.1f}x)"
            )  # fmt: skip
    print("(cells/s; in brackets: against one thread)")
    raw = max(raw_read(files, args.cells_per_file) for _ in range(3))
    print(f"raw h5py row-block read of the same files, one thread (best of 3): {raw:,.0f} cells/s")
    for w, whole in wholes.items():
        print(f"  iter_chunks with {w} threads / raw read: {whole / raw:.2f}")
    if 1 in wholes and 8 in wholes:
        print(f"bar (issue 9): 8 threads / 1 thread = {wholes[8] / wholes[1]:.2f} (>= 3), "
              f"8 threads / raw read = {wholes[8] / raw:.2f} (>= 2)")  # fmt: skip


if __name__ == "__main__":
    main()
