"""End to end on CPU: how much of `tl.stream_train`'s wall time is spent waiting for chunks.

Seeded stream (cached under benchmarks/_data): 10 files x 20,000 cells x 20,000 genes. Default
parameters (chunk 10,000, buffer 2,000, 5 epochs per step, 2,000 genes). The wait per step is measured in
the loop's events (time blocked on the next chunk) and stored in ``uns["sccoreset"]["history"]``.

    python benchmarks/bench_stream.py
    python benchmarks/bench_stream.py --batch-size 1024 --lr 0.002      # any stream_train option by flag
    python benchmarks/bench_stream.py --rounds 3     # also the first build's settings, alternating: a ratio

``--rounds N`` also runs the same stream with the first build's settings (float32 products, one chunk
read ahead beside training: ``cpu_bf16=False, prefetch=1``), alternating with the defaults N times in
this one process, and prints the ratio of the median wall times. That ratio is a lower bound of the
speed-up over the first build: today's float32 path shares every later improvement. With
``--baseline-src DIR`` the comparison is with another version of the package itself: each round runs the
source tree at DIR and this one, each in a fresh process (fit the gene space, then ``stream_train`` with
its defaults, on the same cached files). The first build, before issue 9:

    git -C . worktree add /tmp/first-build 2375ae7      # or: git archive 2375ae7 | tar -x -C /tmp/first-build
    python benchmarks/bench_stream.py --rounds 2 --baseline-src /tmp/first-build

On a noisy machine these same-run ratios, not the wall time against the 33.2 s measured when issue 9 was
filed, are the figures to quote.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import sccoreset as scc

DATA = Path(__file__).parent / "_data"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=None, help="default: StreamConfig's")
    p.add_argument("--lr", type=float, default=None, help="default: StreamConfig's")
    p.add_argument("--rounds", type=int, default=0, help="alternate with the first build's settings N times")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="with --rounds: compare with the package source tree at DIR (its src/), in fresh processes")  # fmt: skip
    args = p.parse_args()
    if args.baseline_src and not args.rounds:
        p.error("--baseline-src needs --rounds N")
    kw = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(DATA / "stream20k", n_files=10, cells_per_file=20_000, n_genes=20_000,
                                           holdout_per_type=100, random_state=3)  # fmt: skip
    print(f"stream ready: 10 files x 20,000 cells x 20,000 genes [{time.perf_counter() - t0:.0f} s]")
    t0 = time.perf_counter()
    gs = scc.pp.fit_gene_space(stream.files, n_top_genes=2000)
    print(f"fit_gene_space: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    cs = scc.tl.stream_train(stream.files, stream.label_key, gene_space=gs, progress=False, device="cpu", **kw)
    wall = time.perf_counter() - t0
    h = cs.uns["sccoreset"]["history"]
    wait = h["wait_seconds"].sum()
    print(f"stream_train wall time:        {wall:.1f} s for {len(h['step'])} steps ({200_000 / wall:,.0f} cells/s)")
    print(f"  waiting for chunks:          {wait:.1f} s = {100 * wait / wall:.1f}% of wall time (bar < 30%)")
    print(f"    of which the first chunk:  {h['wait_seconds'][0]:.1f} s")
    print(f"  training:                    {h['train_seconds'].sum():.1f} s")
    print(f"  selection:                   {h['select_seconds'].sum():.1f} s")
    print(f"  per-step wait (s):           {np.round(h['wait_seconds'], 2).tolist()}")
    import anndata as ad

    from sccoreset._engine._metrics import classification_metrics

    held = ad.read_h5ad(stream.holdout)
    scc.tl.predict(held, cs)
    classes = [str(c) for c in cs.uns["sccoreset"]["classes"]]
    lookup = {c: i for i, c in enumerate(classes)}
    truth = np.array([lookup[c] for c in held.obs[stream.label_key].astype(str)])
    pred = np.array([lookup[c] for c in held.obs["sccoreset_prediction"].astype(str)])
    m = classification_metrics(truth, pred, len(classes))
    print(f"  held-out macro-F1:           {m['macro_f1']:.4f} (accuracy {m['accuracy']:.4f}, {held.n_obs} cells)")
    print(f"  speed-up over the 33.2 s of the first build (same machine, quiet): {33.2 / wall:.2f}x")
    if args.rounds and args.baseline_src:
        compare_versions(stream.files, stream.label_key, args.baseline_src, args.rounds)
    elif args.rounds:
        first_build = {"cpu_bf16": False, "prefetch": 1}
        walls = {"defaults": [wall], "first build's settings": []}
        for _ in range(args.rounds):
            for name, extra in (("first build's settings", first_build), ("defaults", {})):
                t0 = time.perf_counter()
                scc.tl.stream_train(stream.files, stream.label_key, gene_space=gs, progress=False, device="cpu",
                                    **kw, **extra)  # fmt: skip
                walls[name].append(time.perf_counter() - t0)
        for name, w in walls.items():
            print(f"  {name + ':':<31}{np.median(w):.1f} s median of {', '.join(f'{x:.1f}' for x in w)}")
        ratio = np.median(walls["first build's settings"]) / np.median(walls["defaults"])
        print(f"  speed-up over the first build's settings, same run: {ratio:.2f}x (bar 2x)")


_DRIVER = """
import json, sys, time
import sccoreset as scc
key, files = sys.argv[1], sys.argv[2:]
gs = scc.pp.fit_gene_space(files, n_top_genes=2000)
t0 = time.perf_counter()
scc.tl.stream_train(files, key, gene_space=gs, progress=False, device="cpu")
print(json.dumps({"wall": time.perf_counter() - t0, "package": scc.__file__}))
"""


def compare_versions(files, label_key, baseline_src, rounds):
    """``stream_train``'s wall time, the package at ``baseline_src`` against this one, alternating fresh processes."""
    import json
    import os
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent.parent / "src")
    trees = {"baseline": str(Path(baseline_src).resolve() / "src"), "this version": here}
    walls = {name: [] for name in trees}
    for _ in range(rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": src}
            done = subprocess.run([sys.executable, "-c", _DRIVER, label_key, *map(str, files)], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"{name} ({src}) failed:\n{done.stderr[-3000:]}")
            record = json.loads(done.stdout.strip().splitlines()[-1])
            if not record["package"].startswith(src):
                raise RuntimeError(f"{name}: imported {record['package']}, not the package under {src}")
            walls[name].append(record["wall"])
    for name, w in walls.items():
        print(f"  {name + ':':<31}{np.median(w):.1f} s median of {', '.join(f'{x:.1f}' for x in w)}")
    ratio = np.median(walls["baseline"]) / np.median(walls["this version"])
    per_round = [b / t for b, t in zip(walls["baseline"], walls["this version"], strict=True)]
    print(f"  speed-up over {baseline_src}, same run: {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in per_round)}; "
          f"bar 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
