"""Where a GPU training step's time goes (issue 9): the step alone, graphed and eager, its kernels, and
``stream_train``'s host side.

    python benchmarks/gpu_profile.py                                   # the step: timings and kernel tables
    python benchmarks/gpu_profile.py --stream 200000 --genes 20000     # also cProfile a stream_train run

A step is ``--epochs`` epochs over a merged set of ``--cells`` cells (buffer + chunk, 12,000 by default) in
minibatches of ``--batch-size``, through ``GraphedTrainer`` as ``stream_train`` runs it on a GPU: one CUDA graph
replay per epoch (``capture=True``) or the same minibatches launched eagerly (``capture=False``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from sccoreset._engine._graphs import GraphedTrainer
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._objective import Objective
from sccoreset._engine._train import make_optimizer


def make_trainer(args, dev, capture=True, compile=False, adamw="fused", batch_size=None, lean=True):
    model = build_model(mlp_spec(args.features, args.classes, (256, 128))).to(dev)
    if adamw == "fused":
        opt = make_optimizer(model, 1e-3)  # what stream_train uses
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True, capturable=True)
    trainer = GraphedTrainer(model, opt, capacity=args.cells, n_features=args.features,
                          objective=Objective([args.classes]), batch_size=batch_size or args.batch_size, distill=args.distill,
                          capture=capture, compile=compile)  # fmt: skip
    if not lean:  # the step as it was before the lean step (autograd accumulation, per-minibatch loss terms)
        trainer.lean = False
    return trainer


def step_fn(trainer, args, dev):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.cells, args.features, generator=g).to(dev)
    targets = np.random.default_rng(0).integers(0, args.classes, (args.cells, 1))
    stored = torch.zeros((args.cells, args.classes), device=dev)
    is_buffer = torch.arange(args.cells) < args.cells // 6

    def step():
        dyn, _ = trainer.train(X, targets, epochs=args.epochs, generator=g, stored_logits=stored, is_buffer=is_buffer)
        dyn.to_numpy()  # the step's one synchronisation, as in the loop

    return step


def timed(fn, repeats):
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def kernel_table(fn, label, rows):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    total_us = sum(getattr(e, key) for e in events)
    print(f"\n--- {label}: kernels of one step, {total_us / 1000:.2f} ms of device time in all")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def micro(args, dev):
    n_mb = args.epochs * -(-args.cells // args.batch_size)
    print(f"step: {args.cells:,} cells x {args.features} features, {args.classes} classes, {args.epochs} epochs, "
          f"batch {args.batch_size}: {n_mb} minibatches")  # fmt: skip
    variants = [("graph per epoch", {}), ("graph per epoch, not lean", {"lean": False}), ("eager", {"capture": False})]
    if args.more:
        variants += [("graph, foreach AdamW", {"adamw": "foreach"})]
        variants += [(f"graph, batch {b}", {"batch_size": b}) for b in (512, 1024)]
    if args.compile:
        variants.append(("graph per epoch + torch.compile", {"compile": True}))
        variants.append(("  + compiled AdamW step", {"compile": True, "compile_opt": True}))
    fns = {}
    for name, opts in variants:
        opts = {"capture": True, **opts}
        compile_opt = opts.pop("compile_opt", False)
        trainer = make_trainer(args, dev, **opts)
        if compile_opt:
            trainer.optimizer.step = torch.compile(trainer.optimizer.step)
        fns[name] = step_fn(trainer, args, dev)
        t0 = time.perf_counter()
        s = timed(fns[name], args.repeats)
        first = time.perf_counter() - t0 - s * args.repeats
        mb = args.epochs * -(-args.cells // opts.get("batch_size", args.batch_size))
        print(f"  {name:<34} {1000 * s:8.2f} ms a step = {1e6 * s / mb:7.1f} us a minibatch "
              f"= {(args.cells - args.cells // 6) / s:,.0f} chunk cells/s (first two steps {first:.1f} s)")  # fmt: skip
    for name in list(fns)[: 1 if args.more else None]:
        kernel_table(fns[name], name, args.rows)


def stream(args):
    import bench_scale

    import sccoreset as scc

    ns = argparse.Namespace(cells=args.stream, files=max(1, args.stream // 10_000), distinct=10, genes=args.genes,
                            seed=0, data_dir=args.data_dir)  # fmt: skip
    st, files, *_ = bench_scale.make_stream(ns)
    gs = scc.pp.fit_gene_space(files[: min(len(files), 10)], n_top_genes=2000)
    kw = {"device": "cuda", "random_state": 0, "progress": False}
    scc.tl.stream_train(files[:2], st.label_key, gene_space=gs, **kw)  # warm: numba, CUDA, cuBLAS
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    cs = scc.tl.stream_train(files, st.label_key, gene_space=gs, **kw)
    prof.disable()
    wall = time.perf_counter() - t0
    p = cs.uns["sccoreset"]["params"]
    print(f"\n--- stream_train, {args.stream:,} cells under cProfile: {wall:.1f} s "
          f"(prepare {float(p['prepare_seconds']):.2f} s, coreset {float(p['coreset_seconds']):.2f} s)")  # fmt: skip
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(args.rows * 2)
    stats.print_callees("_loop.py.*\\(process\\)")
    print(out.getvalue())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=12_000)
    p.add_argument("--features", type=int, default=2000)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--compile", action="store_true", help="also the graphed step with torch.compile")
    p.add_argument("--more", action="store_true", help="also foreach AdamW and larger batches (no kernel tables)")
    p.add_argument("--stream", type=int, default=0, metavar="CELLS", help="also cProfile stream_train on CELLS")
    p.add_argument("--stream-only", action="store_true", help="skip the step's timings and tables")
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--data-dir", default="/tmp/sccoreset_scale")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as stream_train trains (tf32=True)
    if not args.stream_only:
        micro(args, dev)
    if args.stream:
        stream(args)


if __name__ == "__main__":
    main()
