"""Is the weighted coreset a faithful summary of the stream? Class proportions and per-class mean expression.

Streams the cached ``bench_stream`` data (10 files x 20,000 cells x 20,000 genes; generated if missing; with
``--stream accuracy`` bench_accuracy.py's stream and its buffer of 1%),
runs `tl.stream_train` with the defaults and with ``rule="herding"``, then compares, on the gene list:

- weighted class proportions of the coreset (``obs["sccoreset_weight"]``) with the stream's;
- per-class mean log1p-normalized expression of the coreset's kept cells (weights are constant within a
  class, so the weighted class mean is the kept cells' mean) with the stream's, as relative L2 error.

Beside them it prints the sampling floor (uniform random samples of the same sizes) and, with
``--offline-bound``, what herding reaches with the whole stream in memory: the same greedy rule and exchange
pass over every cell of each class at once, not over one chunk and the buffer at a time (holds the stream's
features in memory: 800 MB for the accuracy stream).

    python benchmarks/bench_coreset_weights.py [--quick] [--rules coverage herding] [--stream accuracy]
        [--offline-bound] [--buffer-size N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import sccoreset as scc

DATA = Path(__file__).parent / "_data"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rules", nargs="+", default=["coverage", "herding"], help="selection rules to compare")
    p.add_argument(
        "--stream", choices=["stream", "accuracy"], default="stream",
        help="bench_stream.py's stream (buffer 2,000) or bench_accuracy.py's (10 x 10,000 cells, 5,000 genes, "
        "a late and a rare type, buffer 1%%)",
    )  # fmt: skip
    p.add_argument("--offline-bound", action="store_true",
                   help="also herd every class over all its cells in memory, at the coreset's per-class sizes")  # fmt: skip
    p.add_argument("--buffer-size", type=int, default=None, help="the coreset's size (default: the stream's)")
    args = p.parse_args()
    buffer = {}
    if args.quick:
        stream = scc.datasets.synthetic_stream(DATA / "weights_quick", n_files=3, cells_per_file=3000, n_genes=20_000,
                                               holdout_per_type=100, random_state=3)  # fmt: skip
    elif args.stream == "accuracy":
        stream = scc.datasets.synthetic_stream(DATA / "acc", n_files=10, cells_per_file=10_000, n_genes=5000,
                                               missing_gene_fraction=0.02, holdout_per_type=300, random_state=7)  # fmt: skip
        buffer = {"buffer_size": 1000}
    else:
        stream = scc.datasets.synthetic_stream(DATA / "stream20k", n_files=10, cells_per_file=20_000, n_genes=20_000,
                                               holdout_per_type=100, random_state=3)  # fmt: skip
    if args.buffer_size is not None:
        buffer = {"buffer_size": args.buffer_size}
    gs = scc.pp.fit_gene_space(stream.files, n_top_genes=2000)
    for i, rule in enumerate(args.rules):
        print(f"--- rule={rule!r}")
        compare(scc.tl.stream_train(stream.files, stream.label_key, gene_space=gs, rule=rule, progress=False,
                                    device="cpu", **buffer), stream, gs,
                offline_bound=args.offline_bound and i == len(args.rules) - 1)  # fmt: skip


def compare(cs, stream, gs, offline_bound=False):
    """Print the weighted coreset's class counts and per-class means against the stream's."""
    classes = [str(c) for c in cs.uns["sccoreset"]["classes"]]
    # the stream's per-class sums of log1p-normalized expression on the gene list, one pass; beside them the
    # sums over a uniform random sample of each class as large as the coreset's share of it (the sampling floor)
    sums = np.zeros((len(classes), gs.n_genes))
    rand_sums = np.zeros((len(classes), gs.n_genes))
    counts = np.zeros(len(classes))
    lookup = {c: i for i, c in enumerate(classes)}
    per_class: list[list[np.ndarray]] = [[] for _ in classes]  # with offline_bound: every cell, by class
    kept = cs.obs[stream.label_key].astype(str).map(lookup).value_counts().reindex(range(len(classes)), fill_value=0)
    from sccoreset._io._sources import open_sources

    with open_sources(stream.files) as sources:
        y_all = np.concatenate([[lookup[v] for v in src.read_labels(stream.label_key)[0]] for src in sources])
        rng = np.random.default_rng(0)
        in_sample = np.zeros(y_all.size, dtype=bool)
        for c in range(len(classes)):
            members = np.flatnonzero(y_all == c)
            in_sample[rng.choice(members, min(int(kept[c]), members.size), replace=False)] = True
        offset = 0
        for src in sources:
            cmap = gs.column_map(src.var_names, source=src.name)
            keep = cmap >= 0
            proj = sp.csr_matrix(
                (np.ones(keep.sum()), (np.flatnonzero(keep), cmap[keep])), shape=(len(keep), gs.n_genes)
            )
            labels, _ = src.read_labels(stream.label_key)
            y = np.array([lookup[v] for v in labels])
            for lo in range(0, src.n_obs, 5000):
                b = src.read_rows(lo, min(lo + 5000, src.n_obs))
                full = sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.n_rows, len(src.var_names)))
                lib = np.asarray(full.sum(1)).ravel()
                x = log_norm_with_lib(full @ proj, lib, gs.target_sum)
                np.add.at(sums, y[lo : lo + b.n_rows], x)
                pick = in_sample[offset + lo : offset + lo + b.n_rows]
                np.add.at(rand_sums, y[lo : lo + b.n_rows][pick], x[pick])
                counts += np.bincount(y[lo : lo + b.n_rows], minlength=len(classes))
                if offline_bound:
                    for c in np.unique(y[lo : lo + b.n_rows]):
                        per_class[c].append(x[y[lo : lo + b.n_rows] == c].astype(np.float32))
            offset += src.n_obs
    stream_means = sums / counts[:, None]
    w = cs.obs["sccoreset_weight"].to_numpy()
    yk = np.array([lookup[v] for v in cs.obs[stream.label_key].astype(str)])
    # the coreset's raw counts are on the gene list only: normalise by the cells' full library sizes
    core_x = log_norm_with_lib(cs.layers["counts"], lib_full_sizes(cs, stream, gs), gs.target_sum)
    print(f"stream: {int(counts.sum()):,} cells, coreset: {cs.n_obs:,} cells")
    weighted = np.bincount(yk, weights=w, minlength=len(classes))
    print(f"weighted class counts equal the stream's: {np.allclose(weighted, counts)} "
          f"(max abs diff {np.abs(weighted - counts).max():.2e})")  # fmt: skip
    errors, floor = [], []
    rand_means = rand_sums / np.maximum(kept.to_numpy(), 1)[:, None]
    for c in range(len(classes)):
        sel = yk == c
        if not sel.any():
            continue
        m = np.average(core_x[sel], axis=0, weights=w[sel])
        errors.append(np.linalg.norm(m - stream_means[c]) / np.linalg.norm(stream_means[c]))
        floor.append(np.linalg.norm(rand_means[c] - stream_means[c]) / np.linalg.norm(stream_means[c]))
        print(f"  {classes[c]:<12} kept {sel.sum():>4}  relative L2 error of the mean: {errors[-1]:.4f}"
              f"  (a uniform random sample of {sel.sum()} cells of the class: {floor[-1]:.4f})")  # fmt: skip
    print(f"max relative L2 error of per-class means: {max(errors):.4f} (bar <= 0.05); median {np.median(errors):.4f}")
    print(f"uniform random samples of the same sizes (the sampling floor): max {max(floor):.4f}, "
          f"median {np.median(floor):.4f}")  # fmt: skip
    if offline_bound:
        print_offline_bound(per_class, stream_means, kept.to_numpy())


def print_offline_bound(per_class, stream_means, kept):
    """Herding with the whole stream in memory: each class herded over all its cells, at the coreset's size."""
    import torch

    from sccoreset._engine._herding import herding_order

    errors = []
    for c, parts in enumerate(per_class):
        if not parts or kept[c] == 0:
            continue
        X = torch.from_numpy(np.concatenate(parts))
        pick = herding_order(X, torch.from_numpy(stream_means[c].astype(np.float32)), int(kept[c]))
        m = X[torch.from_numpy(pick)].double().mean(0).numpy()
        errors.append(np.linalg.norm(m - stream_means[c]) / np.linalg.norm(stream_means[c]))
    print(f"offline herding (every cell of each class in memory, same sizes): max {max(errors):.4f}, "
          f"median {np.median(errors):.4f}, smallest {min(errors):.4f}")  # fmt: skip


def log_norm_with_lib(m, lib, target_sum):
    m = sp.csr_matrix(m, dtype=np.float64)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    return np.log1p((sp.diags(scale) @ m).toarray())


def lib_full_sizes(cs, stream, gs):
    """Library size of every kept cell over all its genes, read back by provenance."""
    from sccoreset._io._sources import open_sources

    files = list(cs.uns["sccoreset"]["files"])
    out = np.zeros(cs.n_obs)
    with open_sources([str(f) for f in files]) as sources:
        f_idx = cs.obs["sccoreset_file"].cat.codes.to_numpy()
        rows = cs.obs["sccoreset_row"].to_numpy()
        for f in np.unique(f_idx):
            sel = np.flatnonzero(f_idx == f)
            order = sel[np.argsort(rows[sel])]
            b = sources[f].read_rows_at(rows[order])
            cum = np.concatenate([[0.0], np.cumsum(b.data, dtype=np.float64)])
            out[order] = np.diff(cum[b.indptr])
    return out


if __name__ == "__main__":
    main()
