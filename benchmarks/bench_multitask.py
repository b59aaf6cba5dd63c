"""Multi-task streaming on a Tahoe-like stream against the offline bound with the same heads.

Tahoe-like stream (``datasets.tahoe_stream``, cached under benchmarks/_data): plates as files, every plate
all cell lines and a few of the drugs (drugs arrive along the stream); four tasks: cell line, drug, broad
and fine mechanism of action. The buffer is 1% of the cells. Offline bound: the same MLP with the same
heads, trained on all cells in memory for the same number of epochs per cell (``epochs_per_step``).
Prints every task's held-out macro-F1 for both, and the ratio (the bar: >= 0.95 for every task).

    python benchmarks/bench_multitask.py [--quick] [--budget-key drug ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import sccoreset as scc
from sccoreset._engine._metrics import classification_metrics
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._objective import Objective
from sccoreset._engine._train import make_optimizer, train_epochs
from sccoreset._io._sources import open_sources
from sccoreset.pp._chunks import ChunkReader

DATA = Path(__file__).parent / "_data"


def features(files, gs, keys, tasks):
    """All cells' features and targets (n, n_tasks), in memory."""
    with open_sources(files) as sources:
        reader = ChunkReader(sources, gs, list(keys))
        chunks = [reader.read(0, [(f, 0, s.n_obs)]) for f, s in enumerate(sources)]
    X = np.concatenate([c.X for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    targets = np.stack([np.searchsorted(tasks[k], labels[:, t]) for t, k in enumerate(keys)], 1).astype(np.int64)
    return X, targets


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="10 plates x 2,000 cells, for a smoke run")
    p.add_argument("--budget-key", nargs="*", default=None, help="budget_key of the streaming run(s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", metavar="OPTION=VALUE", help="other stream_train options, e.g. final_epochs=10")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    n_files, per_file = (10, 2000) if args.quick else (10, 10_000)
    t0 = time.perf_counter()
    stream = scc.datasets.tahoe_stream(
        DATA / ("tahoe_quick" if args.quick else "tahoe"), n_files=n_files, cells_per_file=per_file, n_genes=5000,
        random_state=11,
    )  # fmt: skip
    files, keys = [str(f) for f in stream.files], list(stream.label_keys)
    print(
        f"stream: {n_files} plates x {per_file:,} cells, tasks {keys} (generated/cached in {time.perf_counter() - t0:.1f} s)"
    )
    gs = scc.pp.fit_gene_space(files, n_top_genes=2000)
    n_cells = n_files * per_file
    extra = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    cfg = scc.tl.StreamConfig(
        buffer_size=n_cells // 100, chunk_size=min(10_000, n_cells // 10), device=args.device, **extra
    )
    results = {}

    # offline bound: same heads, all cells in memory, epochs_per_step epochs over every cell
    t = time.perf_counter()
    tasks = {k: sorted(set(np.concatenate([scc.pp.scan(files, k).labels]))) for k in keys}
    X, T = features(files, gs, keys, tasks)
    Xe, Te = features([str(stream.holdout)], gs, keys, tasks)
    torch.manual_seed(0)
    sizes = [len(tasks[k]) for k in keys]
    model = build_model(mlp_spec(gs.n_genes, sum(sizes), cfg.hidden)).to(args.device)
    train_epochs(
        model, make_optimizer(model, cfg.lr), torch.from_numpy(X).to(args.device), torch.from_numpy(T).to(args.device),
        epochs=cfg.epochs_per_step, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(0),
        objective=Objective(sizes, balance_loss=True),
    )  # fmt: skip
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(Xe).to(args.device)).cpu()
    pred = Objective(sizes).predictions(logits).numpy()
    results["offline"] = {
        k: classification_metrics(Te[:, t], pred[:, t], sizes[t])["macro_f1"] for t, k in enumerate(keys)
    }
    results["offline"]["seconds"] = time.perf_counter() - t
    del X, T

    budgets = [None] if args.budget_key is None else [args.budget_key]
    for budget in budgets:
        t = time.perf_counter()
        cs = scc.tl.stream_train(
            files, keys, gene_space=gs, eval_data=str(stream.holdout), config=cfg, budget_key=budget, progress=False
        )
        final = cs.uns["sccoreset"]["history"]["final"]["tasks"]
        name = (
            "stream (budget "
            + (" x ".join(budget) if budget else keys[0])
            + ")"
            + (" " + " ".join(args.set) if args.set else "")
        )
        results[name] = {k: float(final[k]["macro_f1"]) for k in keys}
        results[name]["seconds"] = time.perf_counter() - t

    print(f"\nbuffer {cfg.buffer_size:,} cells (1%), chunk {cfg.chunk_size:,}, {cfg.epochs_per_step} epochs per step")
    print(f"{'run':<40}" + "".join(f"{k:>12}" for k in keys) + f"{'seconds':>10}")
    for name, r in results.items():
        print(f"{name:<40}" + "".join(f"{r[k]:>12.3f}" for k in keys) + f"{r['seconds']:>10.1f}")
    off = results["offline"]
    for name, r in results.items():
        if name == "offline":
            continue
        ratios = {k: r[k] / off[k] for k in keys}
        verdict = "met" if min(ratios.values()) >= 0.95 else "NOT met"
        print(
            f"{name}: ratio to offline " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + f" -> bar {verdict}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
