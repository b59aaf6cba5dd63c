"""Training-engine throughput without I/O: the loop on in-memory chunks, eager against CUDA graphs, by batch size.

Chunks of random class-structured features (k x 2,000 genes, 12 classes) go through `StreamLoop` exactly
as `tl.stream_train` sends them; prints cells/s of training + selection and the share of each.

    python benchmarks/bench_engine.py [--device cuda] [--steps 20] [--batch-sizes 256 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sccoreset._config import StreamConfig
from sccoreset._engine._loop import ChunkData, StreamLoop
from sccoreset._engine._model import build_model, mlp_spec


def make_chunks(n_steps: int, k: int, n_genes: int, n_classes: int, seed: int = 0) -> list[ChunkData]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (n_classes, n_genes)).astype(np.float32)
    out = []
    for i in range(n_steps):
        y = rng.integers(0, n_classes, k)
        X = (centers[y] + rng.normal(0, 3, (k, n_genes))).astype(np.float32)
        if torch.cuda.is_available():  # the chunk reader hands out pinned arrays on a GPU machine
            pinned = torch.empty(X.shape, dtype=torch.float32, pin_memory=True).numpy()
            pinned[:] = X
            X = pinned
        prov = {
            "file": np.full(k, i, np.int64),
            "row": np.arange(k, dtype=np.int64),
            "obs_name": np.arange(k).astype(str).astype(object),
        }
        out.append(ChunkData(i, X, y.astype(np.int64), prov))
    return out


def run_once(chunks, cfg: StreamConfig, device: str, n_classes: int, eval_set) -> dict:
    torch.manual_seed(0)
    model = build_model(mlp_spec(chunks[0].X.shape[1], n_classes, cfg.hidden))
    loop = StreamLoop(model, cfg, n_classes=n_classes, device=device, eval_set=None, rng=np.random.default_rng(0))
    loop.process(chunks[0])  # warm-up step (graph capture, cuDNN/cuBLAS heuristics), not timed
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train = select = 0.0
    for c in chunks[1:]:
        e = loop.process(c)
        train += e["train_seconds"]
        select += e["select_seconds"]
    wall = time.perf_counter() - t0
    loop.eval_set = (torch.from_numpy(eval_set[0]).to(device), eval_set[1][:, None])
    final = loop.finish()
    cells = sum(len(c.y) for c in chunks[1:])
    return {"cells_per_s": cells / wall, "train_share": train / wall, "select_share": select / wall,
            "macro_f1": final["macro_f1"], "loss": final["train_loss"]}  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--graphs", choices=["both", "on", "off"], default="both")
    p.add_argument("--compile", choices=["both", "on", "off"], default="off")
    args = p.parse_args()
    n_classes = 12
    chunks = make_chunks(args.steps + 1, args.chunk_size, args.genes, n_classes)
    ev = make_chunks(1, 3000, args.genes, n_classes, seed=0)[0]
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.graphs]
    if args.device != "cuda":
        modes = [False]
    print(f"device {args.device}: {args.steps} steps of {args.chunk_size:,} cells x {args.genes:,} genes, buffer 2,000")
    for bs in args.batch_sizes:
        for graphs, comp in [
            (g, c) for g in modes for c in {"both": [False, True], "on": [True], "off": [False]}[args.compile]
        ]:
            if comp and not graphs:
                continue
            cfg = StreamConfig(
                chunk_size=args.chunk_size, batch_size=bs, cuda_graphs=graphs, compile=comp, progress=False
            )
            r = run_once(chunks, cfg, args.device, n_classes, (ev.X, ev.y))
            print(f"batch {bs:>5} graphs {graphs!s:<5} compile {comp!s:<5}: {r['cells_per_s']:>10,.0f} cells/s  train {100 * r['train_share']:4.0f}%  "
                  f"select {100 * r['select_share']:4.0f}%  final macro-F1 {r['macro_f1']:.3f}  loss {r['loss']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
