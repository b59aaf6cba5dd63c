"""Accuracy on a class-incremental stream: offline bound, naive streaming, random replay, sccoreset rules.

Seeded stream (cached under benchmarks/_data): 10 files x 10,000 cells, 12 types in 4 lineages
(subtypes differ subtly), ~4 types per file, one type only in the second half, one under 1%,
per-file batch effects; a balanced held-out file. Same MLP, same epochs per step, buffer = 1% of cells.

The continual-learning library Avalanche runs on the same stream as a peer, in its own environment
(``.venv-avalanche``, see benchmarks/README.md) and process (benchmarks/peers/peer_avalanche.py): the
features of the package's gene space are computed here once, one array per file (cached as
``benchmarks/_data/<stream>/features.npz``), and every Avalanche strategy (Naive, Replay, class-balanced
Replay, GDumb, DER++, EWC, A-GEM, LwF, Cumulative) trains the same MLP on them with the same optimizer,
minibatch size and epochs per file, its memory the size of sccoreset's buffer. One table holds every row.

    python benchmarks/bench_accuracy.py [--quick] [--configs NAME ...] [--no-avalanche]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
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
ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).resolve().parent / "peers" / "peer_avalanche.py"
CONFIGS = (
    "offline", "naive", "random", "random-seen", "coverage", "top", "weighted", "forgetting", "sccoreset-random", "herding",
    "ewc", "agem", "agem-layerwise",
)  # fmt: skip
AVALANCHE = ("naive", "replay", "replay-class-balanced", "gdumb", "der++", "ewc", "agem", "lwf", "cumulative")
AVALANCHE_NAMES = {
    "naive": "Naive (fine-tuning)",
    "replay": "Replay",
    "replay-class-balanced": "Replay, class-balanced buffer",
    "gdumb": "GDumb",
    "der++": "DER++",
    "ewc": "EWC (online)",
    "agem": "A-GEM",
    "lwf": "LwF",
    "cumulative": "Cumulative (joint training)",
}


def _venv_python(name):
    path = ROOT / name / "bin" / "python"
    return str(path) if path.exists() else None


def write_features(path, chunks, Xe, ye, classes, params):
    """The features of every step (one per file here) and of the held-out cells, for the peers; cached."""
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if "params" in z and str(z["params"]) == params:
                return
    arrays = {}
    for i, c in enumerate(chunks()):
        arrays[f"X_{i}"], arrays[f"y_{i}"] = c.X, c.y.astype(np.int64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp, **arrays, n_files=len(arrays) // 2, X_test=Xe, y_test=ye.astype(np.int64), classes=np.array(classes),
        params=np.array(params),
    )  # fmt: skip
    tmp.replace(path)


def run_avalanche(python, features, buffer, epochs, batch_size, lr, strategies, extra):
    """The Avalanche strategies in their own environment and process; their JSON results, or None."""
    out = features.with_name("avalanche.json")
    out.unlink(missing_ok=True)
    cmd = [
        python, str(PEER), "--features", str(features), "--memory", str(buffer), "--out", str(out),
        "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(lr), "--strategies", *strategies,
        *extra,
    ]  # fmt: skip
    print(f"\navalanche ({' '.join(strategies)}), in its own process: {python}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)  # its lines print as they come
    if proc.returncode != 0:
        print("  avalanche failed:\n    " + "\n    ".join(proc.stderr.strip().splitlines()[-12:]))
    return json.loads(out.read_text()) if out.exists() else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="3 files x 3,000 cells, for a smoke run")
    p.add_argument("--configs", nargs="*", default=None, choices=CONFIGS, help="sccoreset rows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: StreamConfig's")
    p.add_argument("--lr", type=float, default=None, help="default: StreamConfig's")
    p.add_argument(
        "--seeds", type=int, default=1, help="train every sccoreset row with this many seeds (model and selection); "
        "the table shows their mean, and the per-seed macro-F1 are printed"
    )  # fmt: skip
    p.add_argument("--avalanche", action=argparse.BooleanOptionalAction, default=True, help="run the Avalanche peer")
    p.add_argument("--avalanche-python", default=_venv_python(".venv-avalanche"), help="interpreter with avalanche")
    p.add_argument("--avalanche-strategies", nargs="*", default=list(AVALANCHE), choices=AVALANCHE)
    p.add_argument(
        "--avalanche-args", default="", help="more options of peers/peer_avalanche.py, e.g. '--ewc-lambda 10'"
    )
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

    results, seconds_of = {}, {}
    tuning = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}

    def report(name, metrics, seconds):
        results[name] = metrics
        seconds_of[name] = seconds
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
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model(mlp_spec(gs.n_genes, len(classes)))
            loop = StreamLoop(
                model, cfg, n_classes=len(classes), device=args.device, eval_set=(Xe, ye),
                rng=np.random.default_rng(seed),
            )  # fmt: skip
            for _ in loop.steps(chunks()):
                pass
            runs.append(loop.finish())
        metrics = runs[0]
        if args.seeds > 1:
            f1s = [r["macro_f1"] for r in runs]
            print(f"  {name}: macro-F1 per seed {np.round(f1s, 4).tolist()}, sd {np.std(f1s, ddof=1):.4f}")
            metrics = {**runs[0], "macro_f1": float(np.mean(f1s)), "accuracy": float(np.mean([r["accuracy"] for r in runs])),
                       "f1": np.mean([r["f1"] for r in runs], axis=0)}  # fmt: skip
        report(name, metrics, time.perf_counter() - t)

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
    for rule in ("coverage", "top", "weighted", "forgetting", "random", "herding"):
        name = f"sccoreset rule={rule}" + (" (default)" if rule == "coverage" else "")
        if want(rule if rule != "random" else "sccoreset-random"):
            engine_run(name, rule=rule)
    # the default configuration with a continual-learning regularizer of stream_train on top of its buffer
    for reg in ("ewc", "agem", "agem_layerwise"):
        if want(reg.replace("_", "-")):
            try:
                engine_run(f"sccoreset regularizer={reg!r}", regularizer=reg)
            except Exception as e:  # noqa: BLE001 (an option the engine may not implement yet)
                print(f"sccoreset regularizer={reg!r}: not available ({type(e).__name__}: {e})", flush=True)

    peer = None
    if args.avalanche and args.avalanche_strategies:
        if args.avalanche_python is None:
            print("\navalanche skipped: no .venv-avalanche (make one: see benchmarks/README.md)")
        else:
            features = Path(stream.holdout).parent / "features.npz"
            digest = hashlib.sha1("\n".join(map(str, gs.genes)).encode() + gs.mean.tobytes() + gs.std.tobytes())
            params = json.dumps({"stream": str(stream.params), "gene_space": digest.hexdigest()})
            write_features(features, chunks, Xe, ye, classes, params)
            cfg = StreamConfig(**tuning)
            peer = run_avalanche(
                args.avalanche_python, features, buffer, epochs, cfg.batch_size, cfg.lr, args.avalanche_strategies,
                args.avalanche_args.split(),
            )  # fmt: skip

    rows = [
        (name, m["macro_f1"], m["accuracy"], np.nan_to_num(m["f1"]), seconds_of[name]) for name, m in results.items()
    ]
    if peer is not None:
        for key, m in peer["strategies"].items():
            f1 = np.nan_to_num(np.array(m["f1"], dtype=np.float64))
            rows.append((f"Avalanche {AVALANCHE_NAMES[key]}", m["macro_f1"], m["accuracy"], f1, m["seconds"]))
        meta = peer["meta"]
        print(
            f"\nAvalanche {meta['avalanche']} (torch {meta['torch']}): memory {meta['memory']} cells, "
            f"{meta['epochs']} epochs per file, batch {meta['batch_size']}, AdamW lr {meta['lr']}; "
            f"EWC lambda {meta['ewc_lambda']} decay {meta['ewc_decay']}, A-GEM sample {meta['agem_sample_size']}, "
            f"DER++ alpha {meta['der_alpha']} beta {meta['der_beta']}, LwF alpha {meta['lwf_alpha']} "
            f"T {meta['lwf_temperature']}"
        )
    print(f"\n| {'method':<40} | macro-F1 | accuracy | min class F1 | seconds |")
    print(f"|{'-' * 42}|---------:|---------:|-------------:|--------:|")
    for name, f1m, acc, f1, sec in rows:
        print(f"| {name:<40} | {f1m:8.3f} | {acc:8.3f} | {f1.min():12.2f} | {sec:7.0f} |")

    default = results.get("sccoreset rule=coverage (default)")
    if default is not None and peer is not None:
        ours = default["macro_f1"]
        others = {k: m["macro_f1"] for k, m in peer["strategies"].items() if k != "cumulative"}
        if others:
            best = max(others, key=others.get)
            print(
                f"\ndefault - best Avalanche strategy at the same memory ({AVALANCHE_NAMES[best]}) macro-F1: "
                f"{ours - others[best]:+.3f}   (bar > 0)"
            )
        if "cumulative" in peer["strategies"]:
            cum = peer["strategies"]["cumulative"]["macro_f1"]
            print(f"default - Avalanche Cumulative (joint training) macro-F1:  {ours - cum:+.3f}   (bar >= -0.01)")
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
