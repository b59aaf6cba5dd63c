"""A million-cell stream end to end (issue 9): throughput, where the time goes, peak memory, final macro-F1.

The stream: ``--distinct`` seeded files of ``--cells / --files`` cells x ``--genes`` genes made by
``datasets.synthetic_stream``, hard-linked (copied where links are impossible) over and over into
``--files`` files, cached in ``--data-dir``. The gene space is fitted once (timed on its own); then
``tl.stream_train`` runs with the package's defaults (chunk 10,000, buffer 2,000, 5 epochs per step,
default MLP) unless flags say otherwise, without eval data; only the final model is scored, by
``tl.predict`` on the generator's balanced held-out cells.

Printed: cells/s and wall time of stream_train, the shares of wall time spent waiting for chunks,
training, selecting and evaluating (sums of the per-step history), peak host RSS and peak GPU memory
during stream_train, final macro-F1, and the cells/s of fit_gene_space. ``--compare-cpu N`` also
trains on the first N cells on CPU and CUDA with the same seed (bar: macro-F1 within 0.01).

    python benchmarks/bench_scale.py                                  # 1,000,000 cells, 20,000 genes
    python benchmarks/bench_scale.py --compare-cpu 100000 --json scale.json
    python benchmarks/bench_scale.py --cells 40000 --files 4 --genes 2000 --device cpu   # smoke run

Data-parallel (issue 11): under torchrun every rank runs the script; rank 0 generates the stream and fits
the gene space, every rank trains its share, and rank 0 prints each rank's shares and peak GPU memory, the
end-to-end cells/s (the slowest rank's wall time) and the final macro-F1 of rank 0's coreset. Give it
the JSON of a one-GPU run to print the speed-up and the macro-F1 difference:

    python benchmarks/bench_scale.py --json one.json
    torchrun --nproc_per_node=2 benchmarks/bench_scale.py --json two.json --compare-to one.json --out cs.h5ad
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _common import macro_f1, peak_rss_mib, reset_peak_rss, rss_mib, write_json

import sccoreset as scc
from sccoreset._cli_io import process_group
from sccoreset._engine._distributed import barrier, broadcast_object, gather_objects

DATA = Path(__file__).parent / "_data" / "scale"


def make_stream(args):
    """The distinct files (generated once, reused) and the list of ``--files`` links cycling over them."""
    per_file = args.cells // args.files
    distinct = max(1, min(args.distinct, args.files))
    base = Path(args.data_dir) / f"g{args.genes}_c{per_file}_d{distinct}_s{args.seed}"
    fresh = not (base / "manifest.json").exists()
    t0 = time.perf_counter()
    stream = scc.datasets.synthetic_stream(
        base, n_files=distinct, cells_per_file=per_file, n_genes=args.genes, random_state=args.seed
    )
    gen_seconds = time.perf_counter() - t0
    links_dir = base / f"links_{args.files}"
    links_dir.mkdir(exist_ok=True)
    files, copied = [], 0
    for i in range(args.files):
        src = Path(stream.files[i % distinct])
        dst = links_dir / f"part_{i:05d}.h5ad"
        if dst.exists() and not (os.path.samefile(src, dst) or dst.stat().st_size == src.stat().st_size):
            dst.unlink()
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
                copied += 1
        files.append(str(dst))
    if copied:
        print(f"  (hard links impossible here: {copied} files copied)")
    return stream, files, per_file, distinct, gen_seconds, fresh


def train_kwargs(args, device):
    """Only the options given on the command line: everything else stays at the package's defaults."""
    kw = {"device": device, "random_state": args.seed, "progress": False}
    for flag in ("chunk_size", "buffer_size", "epochs_per_step", "batch_size"):
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    for item in args.set or []:  # any other StreamConfig option, e.g. --set compile=true
        key, _, value = item.partition("=")
        kw[key] = {"true": True, "false": False}.get(value.lower(), _number(value))
    return kw


def _number(value):
    """``--set`` values: an int or a float where they read as one, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def final_macro_f1(coreset, holdout, label_key):
    t0 = time.perf_counter()
    scc.tl.predict(holdout, coreset)
    f1 = macro_f1(holdout.obs[label_key], holdout.obs["sccoreset_prediction"])
    return f1, time.perf_counter() - t0


def timed_run(files, label_key, gs, kw, n_cells):
    """stream_train once: wall time, the history's shares, peak host RSS and peak GPU memory during the call."""
    cuda = str(kw["device"]).startswith("cuda")
    if cuda:
        torch.zeros(1, device=kw["device"])  # CUDA context created outside the timed region
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # compile the numba kernels outside the timed region (a one-off of seconds, cached on disk afterwards)
    next(iter(scc.pp.iter_chunks(files[:1], gs, chunk_size=256, label_key=label_key, n_workers=1)))
    rss_before = rss_mib()
    rss_reset = reset_peak_rss()
    barrier()  # under torchrun the ranks start together
    t0 = time.perf_counter()
    cs = scc.tl.stream_train(files, label_key, gene_space=gs, **kw)
    wall = time.perf_counter() - t0
    h = cs.uns["sccoreset"]["history"]
    res = {
        "device": str(kw["device"]),
        "cells": n_cells,
        "steps": len(h["step"]),
        "wall_seconds": wall,
        "cells_per_s": n_cells / wall,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_is_process_lifetime": not rss_reset,
    }
    for part in ("wait", "train", "select", "eval"):
        res[f"{part}_seconds"] = float(h[f"{part}_seconds"].sum())
        res[f"{part}_share"] = res[f"{part}_seconds"] / wall
    res["first_wait_seconds"] = float(h["wait_seconds"][0])
    # the stream's steady state: steps after the first, timed from the per-step history
    per_step = sum(h[f"{p}_seconds"][1:] for p in ("wait", "train", "select", "eval"))
    res["steady_cells_per_s"] = float(h["n_chunk"][1:].sum() / per_step.sum()) if len(per_step) else float("nan")
    res["steady_train_share"] = float(h["train_seconds"][1:].sum() / per_step.sum()) if len(per_step) else float("nan")
    res["other_share"] = 1 - sum(res[f"{p}_share"] for p in ("wait", "train", "select", "eval"))
    params = cs.uns["sccoreset"]["params"]
    res["prepare_seconds"] = float(params["prepare_seconds"])  # scan, checks, model, first CUDA use
    res["coreset_seconds"] = float(params["coreset_seconds"])  # counts and obs of the kept cells read back
    if cuda:
        res["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    res["cells_read"] = int(h["n_local"].sum()) if "n_local" in h else n_cells
    return cs, res


def report(res):
    print(f"stream_train on {res['device']}: {res['cells']:,} cells in {res['steps']} steps")
    print(f"  wall time:                   {res['wall_seconds']:.1f} s")
    print(f"  cells/s end to end:          {res['cells_per_s']:,.0f}")
    print(
        f"  steady state (steps 2..):    {res['steady_cells_per_s']:,.0f} cells/s, "
        f"training {100 * res['steady_train_share']:.0f}% of it"
    )
    for part, what in (
        ("wait", "waiting for chunks"), ("train", "training"), ("select", "selection"), ("eval", "evaluation"),
    ):  # fmt: skip
        print(f"  {what + ':':<28} {res[f'{part}_seconds']:8.1f} s = {100 * res[f'{part}_share']:5.1f}% of wall time")
    print(f"  other (scan, final epochs, coreset):  {100 * res['other_share']:5.1f}% of wall time")
    print(
        f"    of which preparation {res['prepare_seconds']:.1f} s, building the coreset {res['coreset_seconds']:.1f} s"
    )
    print(f"  first chunk's wait:          {res['first_wait_seconds']:.2f} s")
    life = " (process lifetime: could not reset)" if res["peak_rss_is_process_lifetime"] else ""
    print(
        f"  peak host RSS:               {res['peak_rss_mib']:,.0f} MiB{life} "
        f"({res['peak_rss_mib'] - res['rss_before_mib']:+,.0f} MiB over the {res['rss_before_mib']:,.0f} MiB before)"
    )
    if "peak_gpu_allocated_mib" in res:
        print(
            f"  peak GPU memory:             {res['peak_gpu_allocated_mib']:,.0f} MiB allocated, "
            f"{res['peak_gpu_reserved_mib']:,.0f} MiB reserved"
        )
    else:
        print("  peak GPU memory:             - (not on CUDA)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="cells in the stream (default 1,000,000)")
    p.add_argument("--files", type=int, default=None, help="files in the stream (default: 10,000 cells each)")
    p.add_argument("--distinct", type=int, default=10, help="distinct generated files, linked over (default 10)")
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of stream_train")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--buffer-size", type=int, default=None)
    p.add_argument("--epochs-per-step", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--set", nargs="*", metavar="OPTION=VALUE", help="other stream_train options, e.g. compile=true")
    p.add_argument("--compare-cpu", type=int, default=0, metavar="N", help="also CPU vs CUDA on the first N cells")
    p.add_argument("--compare-seeds", type=int, default=1, metavar="K", help="--compare-cpu with K training seeds")
    p.add_argument("--compare-to", default=None, metavar="JSON", help="a one-process run's --json: print the speed-up")
    p.add_argument(
        "--gene-space",
        default=None,
        metavar="NPZ",
        help="load the gene space from here when it exists, else fit it and save it here",
    )
    p.add_argument("--out", default=None, metavar="PATH", help="rank 0 writes the coreset here (.h5ad)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    args = p.parse_args()
    options = {"device": args.device}
    with process_group(options) as (rank, world):  # a no-op without torchrun
        run(args, options["device"], rank, world)


def run(args, device, rank, world):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    record = {
        "args": vars(args),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "sccoreset": getattr(scc, "__version__", "?"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": world,
    }
    ranks = f", {world} ranks (torchrun)" if world > 1 else ""
    say(f"device {device}" + (f" ({record['gpu']})" if record["gpu"] else "") + f", {record['cpus']} CPUs{ranks}")

    if args.files is None:
        args.files = max(1, args.cells // 10_000)
    if not lead:
        barrier()  # rank 0 generates the files first
    stream, files, per_file, distinct, gen_seconds, fresh = make_stream(args)
    if lead:
        barrier()
    n_cells = per_file * len(files)
    record["stream"] = {"cells": n_cells, "files": len(files), "distinct_files": distinct, "cells_per_file": per_file,
                        "genes": args.genes, "generated_now": fresh, "generate_seconds": gen_seconds,
                        "generate_seconds_per_file": gen_seconds / distinct if fresh else None}  # fmt: skip
    how = f"generated in {gen_seconds:.1f} s = {gen_seconds / distinct:.1f} s per distinct file" if fresh else "cached"
    say(
        f"stream: {n_cells:,} cells in {len(files)} files x {per_file:,} cells x {args.genes:,} genes, "
        f"{distinct} distinct, hard-linked ({how})"
    )

    gs = None
    if lead and args.gene_space and Path(args.gene_space).exists():
        # a stream of linked copies has the gene space of its distinct files: runs of other lengths can share it
        gs = scc.pp.GeneSpace.from_dict(dict(np.load(args.gene_space, allow_pickle=False)))
        print(f"gene space loaded from {args.gene_space} ({gs.n_genes} genes)")
    elif lead:
        t0 = time.perf_counter()
        gs = scc.pp.fit_gene_space(files, n_top_genes=args.n_top_genes)
        fit_s = time.perf_counter() - t0
        record["fit_gene_space"] = {"seconds": fit_s, "cells_per_s": n_cells / fit_s, "n_genes": gs.n_genes}
        print(f"fit_gene_space: {fit_s:.1f} s = {n_cells / fit_s:,.0f} cells/s ({gs.n_genes} genes)")
        if args.gene_space:
            np.savez(args.gene_space, **gs.to_dict())
    gs = broadcast_object(gs)

    kw = train_kwargs(args, device)
    cs, res = timed_run(files, stream.label_key, gs, kw, n_cells)
    per_rank = gather_objects(res)
    if world > 1:
        res = dict(per_rank[0])
        res["wall_seconds"] = max(r["wall_seconds"] for r in per_rank)  # the run ends with its slowest rank
        res["cells_per_s"] = n_cells / res["wall_seconds"]
        res["per_rank"] = per_rank
    if lead:
        holdout = ad.read_h5ad(stream.holdout)
        res["final_macro_f1"], res["predict_seconds"] = final_macro_f1(cs, holdout, stream.label_key)
        res["coreset_cells"] = cs.n_obs
        record["run"] = res
        report(res)
        if world > 1:
            report_ranks(per_rank)
        print(f"  final macro-F1 (held out):   {res['final_macro_f1']:.4f} on {holdout.n_obs:,} cells")
        if args.out:
            write_and_check(cs, args.out, holdout, stream.label_key, res)
        if args.compare_to:
            record["comparison"] = compare(res, args.compare_to)
    del cs

    if args.compare_cpu and world == 1:
        compare_cpu(args, files, per_file, stream, gs, holdout, record)
    if args.json and lead:
        write_json(args.json, record)


def report_ranks(per_rank):
    print("  per rank:   cells read   wall s   wait %   train %   select %   peak GPU MiB (allocated / reserved)")
    for r, res in enumerate(per_rank):
        gpu = (f"{res['peak_gpu_allocated_mib']:,.0f} / {res['peak_gpu_reserved_mib']:,.0f}"
               if "peak_gpu_allocated_mib" in res else "-")  # fmt: skip
        print(
            f"    rank {r}: {res['cells_read']:>11,} {res['wall_seconds']:8.1f} {100 * res['wait_share']:8.1f} "
            f"{100 * res['train_share']:9.1f} {100 * res['select_share']:10.1f}   {gpu}"
        )


def write_and_check(cs, out, holdout, label_key, res):
    """Rank 0's coreset written, read back, and used to predict the held-out cells."""
    cs.write_h5ad(out)
    back = ad.read_h5ad(out)
    f1, _ = final_macro_f1(back, holdout.copy(), label_key)
    res["read_back_macro_f1"] = f1
    print(f"  coreset written to {out} ({back.n_obs:,} cells); read back, it predicts with macro-F1 {f1:.4f}")


def compare(res, path):
    import json

    one = json.loads(Path(path).read_text())["run"]
    out = {
        "speedup_end_to_end": res["cells_per_s"] / one["cells_per_s"],
        "one_process_cells_per_s": one["cells_per_s"],
        "macro_f1_diff": res["final_macro_f1"] - one["final_macro_f1"],
        "one_process_macro_f1": one["final_macro_f1"],
    }
    out["speedup_met"] = out["speedup_end_to_end"] >= 1.7
    out["macro_f1_met"] = abs(out["macro_f1_diff"]) <= 0.02
    print(f"\nagainst the one-process run ({path}):")
    print(f"  cells/s end to end: {res['cells_per_s']:,.0f} vs {one['cells_per_s']:,.0f} = "
          f"{out['speedup_end_to_end']:.2f}x (bar >= 1.7x: {'met' if out['speedup_met'] else 'NOT met'})")  # fmt: skip
    print(f"  macro-F1: {res['final_macro_f1']:.4f} vs {one['final_macro_f1']:.4f}, difference "
          f"{out['macro_f1_diff']:+.4f} (bar |diff| <= 0.02: {'met' if out['macro_f1_met'] else 'NOT met'})")  # fmt: skip
    return out


def compare_cpu(args, files, per_file, stream, gs, holdout, record):
    n_files = max(1, -(-args.compare_cpu // per_file))
    sub = files[:n_files]
    cmp = {"cells": n_files * per_file, "files": n_files}
    print(f"\nCPU vs CUDA, same seed, first {cmp['cells']:,} cells ({n_files} files):")
    if not torch.cuda.is_available():
        print("  skipped: no CUDA device")
        cmp["skipped"] = "no CUDA device"
    else:
        diffs = []
        for seed in range(args.seed, args.seed + args.compare_seeds):  # same stream, training seeds
            for dev in ("cpu", "cuda"):
                kw = {**train_kwargs(args, dev), "random_state": seed}
                cs, r = timed_run(sub, stream.label_key, gs, kw, cmp["cells"])
                r["final_macro_f1"], _ = final_macro_f1(cs, holdout, stream.label_key)
                cmp[f"{dev}_seed{seed}"] = r
                print(f"  seed {seed} {dev:>4}: macro-F1 {r['final_macro_f1']:.4f}  [{r['wall_seconds']:.1f} s, {r['cells_per_s']:,.0f} cells/s]")  # fmt: skip
            diffs.append(cmp[f"cuda_seed{seed}"]["final_macro_f1"] - cmp[f"cpu_seed{seed}"]["final_macro_f1"])
            print(f"  seed {seed} difference (cuda - cpu): {diffs[-1]:+.4f}")
        diff = float(np.mean(diffs))
        cmp["macro_f1_diffs"], cmp["macro_f1_diff"] = diffs, diff
        cmp["within_0.01"] = abs(diff) <= 0.01
        print(f"  mean difference over {len(diffs)} seed(s): {diff:+.4f}   (bar |diff| <= 0.01: {'met' if abs(diff) <= 0.01 else 'NOT met'})")  # fmt: skip
    record["compare_cpu"] = cmp


if __name__ == "__main__":
    main()
