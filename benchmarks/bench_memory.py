"""Peak host memory of `tl.stream_train` against chunk_size, buffer_size and prefetch (issue 8), vs a formula.

Seeded stream (cached under benchmarks/_data/memory): 6 files x 20,000 cells x 20,000 genes, ~2,000
nonzeros per cell (as in bench_io.py); 2,000 genes in the gene space; 1 epoch per step and 1 final
epoch (memory does not depend on epochs), CPU. Every configuration runs in a fresh subprocess, which
reports its own peak RSS (VmHWM); a baseline child imports sccoreset and torch, loads the gene space
and opens (scans) the files without training. Printed: one row per configuration with the peak RSS,
the peak above the baseline, the prediction of `predicted_mib` and the ratio measured / predicted. A
second, "warm" baseline child also runs stream_train on 500 cells (numba kernels loaded, torch's first
training steps: ~160 MiB that do not grow with the sizes); "ratio warm" compares the peak above it.
``--table PATH`` reprints a saved ``--json`` run with the current ``predicted_mib`` (no measuring).

    python benchmarks/bench_memory.py [--quick] [--json PATH]
    python benchmarks/bench_memory.py --table PATH
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from _common import MIB, peak_rss_mib, rss_mib, write_json

DATA = Path(__file__).parent / "_data" / "memory"
F32 = 4  # bytes of a float32 feature; CSR data (float32) + indices (int32) cost 4 + 4 bytes per nonzero
OBS_BYTES_PER_CELL = 100  # per cell of a live chunk: obs name (a Python str + pointer), label pointer, file, row


N_WORKERS = 2  # reading threads, fixed so the formula does not depend on the machine


def predicted_mib(
    chunk_size: int, buffer_size: int, prefetch: int, n_genes: int, nnz_per_cell: float, n_workers: int = N_WORKERS
) -> float:
    """Predicted peak host memory of stream_train above a process that has imported and opened everything (MiB).

    k = chunk_size, m = buffer_size, p = prefetch, G = genes of the gene space, z = nonzeros per cell of the
    densest chunk (the pooled read buffers keep the size of the largest chunk they have held).
    The peak is reached during a step (train or select) while the background reader is blocked with
    everything it may hold: with prefetch the pipeline is full by then, because reading outruns training.
    """
    k, m, p, G, z = chunk_size, buffer_size, prefetch, n_genes, nnz_per_cell
    dense_chunk = k * G * F32
    # Transformed chunks, dense float32 (pp/_chunks.py ChunkReader.transform via ArrayRecycler): the one
    # the loop trains on (it stays referenced while the next is fetched), p waiting in the prefetch queue,
    # and one finished by the transform thread that waits to be queued: p + 2. Without prefetch (p = 0) the
    # next chunk is transformed while the current one is still referenced: 2. The recycler keeps up to 3
    # arrays alive (and resident) even when idle, so these are resident for the whole run.
    n_dense = p + 2 if p > 0 else 2
    w = n_workers
    if w > 1:
        # parallel reader (io/_parallel.py): up to p + w chunks in flight besides the one the loop holds
        n_dense = p + w + 1
    # Raw CSR row blocks (io/_sources.py ReadBuffers): data + indices of a whole chunk, k * z * 8 bytes,
    # plus indptr (k + 1) * 8. Two pooled buffers with prefetch (one being filled while the other is
    # transformed), one without. Pooled buffers stay touched (resident) between chunks; their 1.5x growth
    # headroom is never written, so it is not resident.
    n_raw = 2 if p > 0 else 1
    if w > 1:
        n_raw = w  # every worker reads into read buffers of its own
    raw_chunk = k * z * (4 + 4) + (k + 1) * 8
    # Obs names, labels and provenance of every live chunk (small).
    obs = (n_dense + n_raw) * k * OBS_BYTES_PER_CELL
    # The loop (engine/_loop.py run): buffer and chunk concatenated into a new (m + k) x G array for the
    # step; on CPU torch.from_numpy shares it (no copy). During selection the old buffer (m x G) is still
    # referenced while X[keep] builds the new one (m x G). X[new] for the stored logits (<= m x G) is
    # freed before X[keep] is made. Logits (n x classes), dynamics (~45 bytes per cell), minibatches,
    # the model and AdamW state: under 5 MiB at these sizes, left out.
    engine = (k + m) * G * F32 + 2 * m * G * F32
    return (n_dense * dense_chunk + n_raw * raw_chunk + obs + engine) / MIB


def configs(scale: float, sweep_only: str = "all") -> list[dict]:
    """chunk_size sweep, buffer_size sweep at chunk 20k, prefetch sweep (scaled down with --quick)."""

    def c(chunk, buffer, prefetch):
        return {"chunk_size": int(chunk * scale), "buffer_size": int(buffer * scale), "prefetch": prefetch}

    sweep = [c(k, 2000, 1) for k in (10_000, 20_000, 40_000)]
    if sweep_only == "all":
        sweep += [c(20_000, m, 1) for m in (1000, 2000, 4000)]
        sweep += [c(20_000, 2000, p) for p in (0, 1, 2)]
    unique = []
    for cfg in sweep:
        if cfg not in unique:
            unique.append(cfg)
    return unique


def _watch_peak(stop: threading.Event, out: dict, t0: float):
    """Sample RSS every 20 ms: when the peak happened (fraction of wall time)."""
    best = 0.0
    while not stop.wait(0.02):
        r = rss_mib()
        if r > best:
            best, out["peak_at_s"] = r, time.perf_counter() - t0


def child(spec: dict) -> None:
    """One fresh process: imports, gene space, scan; then stream_train (a tiny warm-up one for "warm")."""
    import torch

    import sccoreset as scc

    gs = pickle.loads(Path(spec["gene_space"]).read_bytes())
    scc.pp.scan(spec["files"], spec["label_key"])
    out = {"rss_ready_mib": rss_mib(), "torch_threads": torch.get_num_threads()}
    fixed = {
        "epochs_per_step": 1,
        "final_epochs": 1,
        "progress": False,
        "device": "cpu",
        "random_state": 0,
        "n_workers": N_WORKERS,
    }
    if spec["mode"] == "warm":  # numba kernels loaded, torch's first training step, threads, anndata writing
        scc.tl.stream_train(spec["tiny"], spec["label_key"], gene_space=gs, chunk_size=200, buffer_size=50, **fixed)
    elif spec["mode"] == "run":
        stop, t0 = threading.Event(), time.perf_counter()
        watcher = threading.Thread(target=_watch_peak, args=(stop, out, t0), daemon=True)
        watcher.start()
        cs = scc.tl.stream_train(spec["files"], spec["label_key"], gene_space=gs, **fixed, **spec["config"])
        stop.set()
        watcher.join()
        out["wall_s"] = time.perf_counter() - t0
        out["wait_s"] = float(cs.uns["sccoreset"]["history"]["wait_seconds"].sum())
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and could report the parent's peak
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def run_child(spec: dict, path: Path) -> dict:
    path.write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"child failed: {spec['mode']} {spec.get('config')}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def densest_chunk_nnz(row_nnz: np.ndarray, chunk_size: int) -> float:
    """Nonzeros per cell of the densest chunk of a sequential plan: what the pooled read buffers grow to."""
    ends = np.concatenate([[0], np.cumsum(row_nnz)])
    bounds = np.minimum(np.arange(0, row_nnz.size + chunk_size, chunk_size), row_nnz.size)
    bounds = np.unique(bounds)
    return float((np.diff(ends[bounds]) / np.diff(bounds)).max())


HEADER = (
    f"{'chunk':>7} {'buffer':>7} {'prefetch':>8} | {'peak RSS MiB':>12} | {'above baseline':>14} | "
    f"{'above warm':>10} | {'predicted MiB':>13} | {'ratio':>5} | {'ratio warm':>10} | {'peak at':>7} | {'wall s':>6}"
)


def table_row(row: dict, baseline: float, warm: float, n_genes: int) -> dict:
    """Prediction and ratios of one measured configuration (recomputed, so --table uses the current formula)."""
    pred = predicted_mib(row["chunk_size"], row["buffer_size"], row["prefetch"], n_genes, row["nnz_per_cell"])
    above, above_warm = row["peak_rss_mib"] - baseline, row["peak_rss_mib"] - warm
    row.update(above_baseline_mib=above, above_warm_mib=above_warm, predicted_mib=pred, ratio=above / pred,
               ratio_warm=above_warm / pred)  # fmt: skip
    at = row.get("peak_at_s", float("nan")) / row["wall_s"]
    print(
        f"{row['chunk_size']:>7,} {row['buffer_size']:>7,} {row['prefetch']:>8} | {row['peak_rss_mib']:>12,.0f} | "
        f"{above:>14,.0f} | {above_warm:>10,.0f} | {pred:>13,.0f} | {above / pred:>5.2f} | "
        f"{above_warm / pred:>10.2f} | {100 * at:>6.0f}% | {row['wall_s']:>6.1f}",
        flush=True,
    )
    return row


def print_header(record: dict) -> None:
    base, warm = record["baseline"], record["warm_baseline"]
    print(f"baseline (imports, gene space, files opened, no training): peak {base['peak_rss_mib']:,.0f} MiB, "
          f"{base['torch_threads']} torch threads")  # fmt: skip
    print(f"warm baseline (the same + stream_train on 500 cells: numba kernels, torch's first steps): "
          f"peak {warm['peak_rss_mib']:,.0f} MiB (+{warm['peak_rss_mib'] - base['peak_rss_mib']:,.0f})\n")  # fmt: skip
    print(HEADER)
    print("-" * len(HEADER))


def print_footer(rows: list[dict]) -> None:
    for key, what in (("ratio", "above baseline"), ("ratio_warm", "above warm baseline")):
        r = np.array([row[key] for row in rows])
        print(f"ratio {what} / predicted: {r.min():.2f} to {r.max():.2f} (median {np.median(r):.2f})")
    print("nonzeros per cell in the prediction: the densest chunk's (the pooled read buffers keep their size)")
    print("'peak at': when the peak was reached, as a fraction of the child's stream_train wall time")


def retabulate(path: str) -> None:
    """The table of a saved run (--json) with the current predicted_mib: no measuring."""
    record = json.loads(Path(path).read_text())
    print(f"{path}: {record['files']} files x {record['cells_per_file']:,} cells x {record['genes']:,} genes, "
          f"{record['nnz_per_cell']:,.0f} nonzeros per cell (mean)")  # fmt: skip
    print_header(record)
    base, warm = record["baseline"]["peak_rss_mib"], record["warm_baseline"]["peak_rss_mib"]
    rows = [table_row(row, base, warm, record["gene_space"]) for row in record["rows"]]
    print_footer(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", choices=["all", "chunk"], default="all", help="all sweeps, or chunk_size only")
    p.add_argument("--quick", action="store_true", help="3 files x 4,000 cells x 2,000 genes, sizes / 10")
    p.add_argument("--files", type=int, default=None)
    p.add_argument("--cells-per-file", type=int, default=None)
    p.add_argument("--genes", type=int, default=None)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    p.add_argument("--table", default=None, metavar="PATH", help="reprint a --json run with the current formula")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return
    if args.table:
        retabulate(args.table)
        return

    import sccoreset as scc

    n_files = args.files or (3 if args.quick else 6)
    per_file = args.cells_per_file or (4000 if args.quick else 20_000)
    n_genes = args.genes or (2000 if args.quick else 20_000)
    scale = 0.1 if args.quick else 1.0
    base = Path(args.data_dir) / f"f{n_files}_c{per_file}_g{n_genes}"
    fresh = not (base / "manifest.json").exists()
    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(
        base, n_files=n_files, cells_per_file=per_file, n_genes=n_genes, library_size=3000.0,
        holdout_per_type=10, random_state=4,
    )  # fmt: skip
    gen_s = time.perf_counter() - t0
    files = [str(f) for f in stream.files]
    row_nnz = []
    for f in files:
        with h5py.File(f) as h:
            row_nnz.append(np.diff(h["X/indptr"][:]))
    row_nnz = np.concatenate(row_nnz)
    z = float(row_nnz.mean())
    how = f"generated in {gen_s:.0f} s = {gen_s / n_files:.1f} s per file" if fresh else "cached"
    print(f"stream: {n_files} files x {per_file:,} cells x {n_genes:,} genes, {z:,.0f} nonzeros per cell ({how})")
    gs_path = base / f"gene_space_{args.n_top_genes}.pkl"
    if not gs_path.exists():
        gs_path.write_bytes(pickle.dumps(scc.pp.fit_gene_space(files, n_top_genes=args.n_top_genes)))
    G = pickle.loads(gs_path.read_bytes()).n_genes
    spec = {"files": files, "label_key": stream.label_key, "gene_space": str(gs_path)}
    tmp = base / "child_spec.json"

    tiny = base / "tiny_500.h5ad"
    if not tiny.exists():
        import anndata as ad

        ad.read_h5ad(files[0], backed="r")[:500].to_memory().write_h5ad(tiny)
    record = {"cells_per_file": per_file, "files": n_files, "genes": n_genes, "gene_space": G, "nnz_per_cell": z}
    record["baseline"] = run_child({**spec, "mode": "baseline"}, tmp)
    record["warm_baseline"] = run_child({**spec, "mode": "warm", "tiny": str(tiny)}, tmp)
    print_header(record)
    base_mib, warm_mib = record["baseline"]["peak_rss_mib"], record["warm_baseline"]["peak_rss_mib"]
    rows = []
    for cfg in configs(scale, args.sweep):
        res = run_child({**spec, "mode": "run", "config": cfg}, tmp)
        row = {**cfg, **res, "nnz_per_cell": densest_chunk_nnz(row_nnz, cfg["chunk_size"])}
        rows.append(table_row(row, base_mib, warm_mib, G))
    tmp.unlink(missing_ok=True)
    print_footer(rows)
    record["rows"] = rows
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
