"""What one data-parallel training step costs on GPUs, by part (issue 11): the graphed step with and without its
gradient all-reduce, and the all-reduce alone, at the default model's sizes.

    torchrun --standalone --nproc_per_node=2 benchmarks/gpu_ddp_step.py     # two GPUs
    python benchmarks/gpu_ddp_step.py                                      # one GPU: the same step, no all-reduce

A step here is ``--epochs`` epochs over this rank's share of a merged set of ``--cells`` cells (buffer + chunk:
12,000 by default, so 6,000 a rank on two GPUs), in minibatches of ``--batch-size``, as ``stream_train`` does.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from sccoreset._engine._graphs import GraphedTrainer
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._objective import Objective
from sccoreset._engine._train import make_optimizer


def timed(fn, repeats):
    fn()  # warm-up (capture on the first call)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=12_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    n = args.cells * (rank + 1) // world - args.cells * rank // world
    g = torch.Generator().manual_seed(rank)
    X = torch.randn(n, args.genes, generator=g).to(dev)
    targets = np.random.default_rng(rank).integers(0, args.classes, (n, 1))
    stored = torch.zeros((n, args.classes), device=dev)
    is_buffer = torch.zeros(n, dtype=torch.bool)
    out = {}
    variants = [("step with all-reduce", torch.float32), ("step with bf16 all-reduce", torch.bfloat16),
                ("step, all-reduce removed", None)] if world > 1 else [("step", None)]  # fmt: skip
    for name, comm in variants:
        model = build_model(mlp_spec(args.genes, args.classes, (256, 128))).to(dev)
        opt = make_optimizer(model, 1e-3)
        trainer = GraphedTrainer(model, opt, capacity=args.cells, n_features=args.genes,
                                 objective=Objective([args.classes]), batch_size=args.batch_size, distill=0.0)  # fmt: skip
        if comm is None:
            trainer.flat_grad = None  # the gradients stay views of the buffer, but nothing is all-reduced
        else:
            trainer.comm_dtype = comm
        gen = torch.Generator().manual_seed(0)

        def step(trainer=trainer, gen=gen):
            trainer.train(X, targets, epochs=args.epochs, generator=gen, stored_logits=stored, is_buffer=is_buffer,
                          n_max=args.cells - args.cells * (world - 1) // world)  # fmt: skip

        out[name] = timed(step, args.repeats)
    replays = args.epochs * -(-(args.cells - args.cells * (world - 1) // world) // args.batch_size)
    if world > 1:
        flat = sum(p.numel() for p in model.parameters())
        for dtype in (torch.float32, torch.bfloat16):
            buf = torch.zeros(flat, device=dev, dtype=dtype)
            out[f"all-reduce alone ({dtype}), x{replays}"] = timed(lambda buf=buf: [dist.all_reduce(buf) for _ in range(replays)], args.repeats)  # fmt: skip
    if rank == 0:
        print(f"{world} GPU(s) ({torch.cuda.get_device_name(dev)}), {args.cells:,} merged cells, {args.epochs} epochs, "
              f"batch {args.batch_size} a rank: {replays} minibatches a step a rank")  # fmt: skip
        for name, s in out.items():
            print(f"  {name:<40} {1000 * s:8.2f} ms a step = {1e6 * s / replays:7.1f} us a minibatch")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
