"""Accuracy on a class-incremental stream: offline bound, naive streaming, random replay, sccoreset rules.

Seeded stream (cached under benchmarks/_data): 10 files x 10,000 cells, 12 types in 4 lineages
(subtypes differ subtly), ~4 types per file, one type only in the second half, one under 1%,
per-file batch effects; a balanced held-out file. Same MLP, same epochs per step, buffer = 1% of cells.

    python benchmarks/bench_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import sccoreset as scc
from sccoreset._config import StreamConfig
from sccoreset._engine._loop import ChunkData, StreamLoop
from sccoreset._engine._metrics import classification_metrics
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._train import make_optimizer, train_epochs

DATA = Path(__file__).parent / "_data"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="3 files x 3,000 cells, for a smoke run")
    p.add_argument("--configs", nargs="*", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: StreamConfig's")
    p.add_argument("--lr", type=float, default=None, help="default: StreamConfig's")
    args = p.parse_args()
    n_files, per_file = (4, 3000) if args.quick else (10, 10_000)
    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(
        DATA / ("acc_quick" if args.quick else "acc"),
        n_files=n_files,
        cells_per_file=per_file,
        n_genes=5000,
        missing_gene_fraction=0.02,
        holdout_per_type=300,
        random_state=7,
    )
    files, key = [str(f) for f in stream.files], stream.label_key
    info = scc.pp.scan(files, key)
    classes = info.labels
    print(
        f"stream: {len(files)} files, {info.n_cells:,} cells, {len(classes)} types "
        f"(late: {stream.late_type}, rare: {stream.rare_type} = {info.label_counts[stream.rare_type].sum()} cells) "
        f"[{time.perf_counter() - t0:.0f} s]"
    )
    gs = scc.pp.fit_gene_space(files, n_top_genes=2000)
    buffer = info.n_cells // 100
    chunk = per_file
    epochs = 5
    holdout = ad.read_h5ad(stream.holdout)
    lookup = {c: i for i, c in enumerate(classes)}
    Xe = gs.transform(holdout.X, holdout.var_names)
    ye = np.array([lookup[c] for c in holdout.obs[key].astype(str)])

    def chunks():
        for c in scc.pp.iter_chunks(files, gs, chunk_size=chunk, label_key=key):
            y = np.array([lookup[v] for v in c.labels])
            yield ChunkData(
                c.index, c.X, y, {"file": c.file_index.astype(np.int64), "row": c.row, "obs_name": c.obs_names}
            )

    results = {}
    tuning = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}

    def report(name, metrics, seconds):
        results[name] = metrics
        f1 = np.nan_to_num(metrics["f1"])
        print(
            f"{name:<34} macro-F1 {metrics['macro_f1']:.3f}  accuracy {metrics['accuracy']:.3f}  "
            f"min class F1 {f1.min():.2f} ({classes[int(f1.argmin())]})  [{seconds:.0f} s]",
            flush=True,
        )

    def engine_run(name, **kw):
        t = time.perf_counter()
        opts = {"chunk_size": chunk, "buffer_size": buffer, "epochs_per_step": epochs, **tuning, **kw}
        cfg = StreamConfig(**{**opts, "buffer_size": max(opts["buffer_size"], 1)})
        if opts["buffer_size"] == 0:  # naive streaming: the config refuses an empty buffer, the engine does not
            object.__setattr__(cfg, "buffer_size", 0)
        torch.manual_seed(0)
        model = build_model(mlp_spec(gs.n_genes, len(classes)))
        loop = StreamLoop(
            model, cfg, n_classes=len(classes), device=args.device, eval_set=(Xe, ye), rng=np.random.default_rng(0)
        )
        for _ in loop.steps(chunks()):
            pass
        report(name, loop.finish(), time.perf_counter() - t)

    wanted = set(args.configs) if args.configs else None

    def want(name):
        return wanted is None or name in wanted

    if want("offline"):
        t = time.perf_counter()
        X = np.concatenate([c.X for c in chunks()])
        y = np.concatenate([c.y for c in chunks()])
        torch.manual_seed(0)
        model = build_model(mlp_spec(gs.n_genes, len(classes)))
        cfg = StreamConfig(**tuning)
        model.to(args.device)
        opt = make_optimizer(model, cfg.lr)
        train_epochs(
            model, opt, torch.from_numpy(X).to(args.device), torch.from_numpy(y).to(args.device), epochs=epochs,
            batch_size=cfg.batch_size, n_classes=len(classes), generator=torch.Generator().manual_seed(0),
            balance_loss=True,
        )  # fmt: skip
        model.eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(Xe).to(args.device)).argmax(1).cpu().numpy()
        report("offline (all cells in memory)", classification_metrics(ye, pred, len(classes)), time.perf_counter() - t)
        del X, y
    # plain replay: random cells, stratified by class within the current merge, plain loss
    baseline = dict(
        rule="random", class_budget="merged", balance_loss=False, distill=0.0, final_epochs=0, max_chunk_fraction=None
    )
    if want("naive"):
        engine_run("naive streaming (no buffer)", **{**baseline, "buffer_size": 0})
    if want("random"):
        engine_run("class-stratified random replay", **baseline)
    if want("random-seen"):
        engine_run("random replay, budgets over seen", **{**baseline, "class_budget": "proportional"})
    for rule in ("coverage", "top", "weighted", "forgetting", "random"):
        name = f"sccoreset rule={rule}" + (" (default)" if rule == "coverage" else "")
        if want(rule if rule != "random" else "sccoreset-random"):
            engine_run(name, rule=rule)
    if "offline (all cells in memory)" in results and "sccoreset rule=coverage (default)" in results:
        off = results["offline (all cells in memory)"]["macro_f1"]
        ours = results["sccoreset rule=coverage (default)"]
        print(f"\ndefault / offline macro-F1:        {ours['macro_f1'] / off:.3f}   (bar >= 0.95)")
        if "class-stratified random replay" in results:
            rnd = results["class-stratified random replay"]["macro_f1"]
            print(f"default - random replay macro-F1:  {ours['macro_f1'] - rnd:+.3f}   (bar >= +0.10)")
        print(f"default min class F1:              {np.nan_to_num(ours['f1']).min():.3f}   (bar >= 0.5)")


if __name__ == "__main__":
    main()
