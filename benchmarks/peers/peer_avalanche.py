"""Avalanche peer of benchmarks/bench_accuracy.py: continual-learning strategies on the same class-incremental stream.

Runs in its own environment (``.venv-avalanche``, see benchmarks/README.md), never sccoreset's: it imports
numpy, torch and avalanche only. The features come from an .npz written by bench_accuracy.py with the
package's gene space (``X_0``, ``y_0``, ... one pair per file of the stream, in stream order; ``X_test``,
``y_test`` the held-out file; ``classes``), so every strategy learns from exactly the cells sccoreset
learns from.

One Avalanche experience per file (``benchmark_from_datasets`` with the classes timeline), the default MLP
of sccoreset (Linear -> LayerNorm -> ReLU -> Dropout(0.1) blocks, hidden (256, 128)), AdamW (lr 1e-3, no
weight decay, as sccoreset's optimizer), minibatches of 256, 5 epochs per experience, plain cross-entropy
(Avalanche's default criterion). The memory of the rehearsal strategies is the same number of cells as
sccoreset's buffer (A-GEM keeps ``memory // n_experiences`` cells per experience, as many in all at the end).
After the last experience, the model is scored on the held-out cells: accuracy, per-class F1 and macro-F1
over the classes present in the held-out labels (as ``sccoreset._engine._metrics.classification_metrics``).

    .venv-avalanche/bin/python benchmarks/peers/peer_avalanche.py --features F.npz --memory 1000 --out R.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore")  # avalanche's deprecation and "no metrics" warnings
from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_classes_timeline  # noqa: E402
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset  # noqa: E402
from avalanche.training import AGEM, DER, EWC, Cumulative, GDumb, LwF, Naive, Replay  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ClassBalancedBuffer  # noqa: E402

STRATEGIES = ("naive", "replay", "replay-class-balanced", "gdumb", "der++", "ewc", "agem", "lwf", "cumulative")


def _package_module(name: str):
    """A numpy/torch-only module of the package, loaded from its file (sccoreset is not installed here)."""
    path = Path(__file__).resolve().parents[2] / "src" / "sccoreset" / "_engine" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_sccoreset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_model = _package_module("_model")
_metrics = _package_module("_metrics")


def build_mlp(n_in: int, n_out: int) -> nn.Module:
    """sccoreset's default MLP (``build_model(mlp_spec(n_in, n_out))``), from the package's own file."""
    return _model.build_model(_model.mlp_spec(n_in, n_out))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """sccoreset's metrics (from the package's own file), per-class F1 as a JSON list (None for NaN)."""
    out = _metrics.classification_metrics(y_true, y_pred, n_classes)
    return {**out, "f1": [None if np.isnan(v) else float(v) for v in out["f1"]]}


def make_strategy(name: str, model: nn.Module, args, n_experiences: int):
    common = dict(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size,
        train_epochs=args.epochs,
        eval_mb_size=4096,
        device="cpu",
        evaluator=EvaluationPlugin(loggers=[]),
        eval_every=-1,
    )
    m = args.memory
    if name == "naive":
        return Naive(**common)
    if name == "replay":  # random cells, balanced over experiences (Avalanche's default storage policy)
        return Replay(mem_size=m, **common)
    if name == "replay-class-balanced":
        policy = ClassBalancedBuffer(max_size=m, adaptive_size=True)
        return Naive(plugins=[ReplayPlugin(mem_size=m, storage_policy=policy)], **common)
    if name == "gdumb":
        return GDumb(mem_size=m, **common)
    if name == "der++":  # DER++: beta > 0 (Avalanche's defaults alpha 0.1, beta 0.5, those of the paper)
        # its replay minibatch is as large as the stream's (at most the memory: a smaller memory never replays)
        batch_mem = min(args.batch_size, m)
        return DER(mem_size=m, batch_size_mem=batch_mem, alpha=args.der_alpha, beta=args.der_beta, **common)
    if name == "ewc":
        return EWC(ewc_lambda=args.ewc_lambda, mode="online", decay_factor=args.ewc_decay, **common)
    if name == "agem":
        return AGEM(patterns_per_exp=max(m // n_experiences, 1), sample_size=args.agem_sample_size, **common)
    if name == "lwf":
        return LwF(alpha=args.lwf_alpha, temperature=args.lwf_temperature, **common)
    if name == "cumulative":
        return Cumulative(**common)
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help=".npz written by bench_accuracy.py")
    p.add_argument("--memory", type=int, required=True, help="cells of memory (sccoreset's buffer_size)")
    p.add_argument("--out", required=True, help="JSON of the results, one entry per strategy")
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--epochs", type=int, default=5, help="epochs per experience (sccoreset's epochs_per_step)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--der-alpha", type=float, default=0.1)
    p.add_argument("--der-beta", type=float, default=0.5)
    p.add_argument("--ewc-lambda", type=float, default=1e7, help="tuned: best of 1e2..1e8 on the --quick stream")
    p.add_argument("--ewc-decay", type=float, default=0.9)
    p.add_argument("--agem-sample-size", type=int, default=256)
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--lwf-temperature", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import avalanche

    z = np.load(args.features, allow_pickle=False)
    classes = [str(c) for c in z["classes"]]
    n_files = int(z["n_files"])
    n_classes = len(classes)
    train = []
    for i in range(n_files):
        X, y = torch.from_numpy(z[f"X_{i}"]), torch.from_numpy(z[f"y_{i}"].astype(np.int64))
        train.append(_make_taskaware_tensor_classification_dataset(X, y, task_labels=0, targets=y.tolist()))
    Xe, ye = torch.from_numpy(z["X_test"]), z["y_test"].astype(np.int64)
    bench = with_classes_timeline(benchmark_from_datasets(train=train))
    print(
        f"avalanche {avalanche.__version__}, torch {torch.__version__}: {n_files} experiences, "
        f"{sum(len(d) for d in train):,} cells, {n_classes} classes, memory {args.memory}, {args.epochs} epochs",
        flush=True,
    )
    results = {
        "meta": {
            "avalanche": avalanche.__version__,
            "torch": torch.__version__,
            "memory": args.memory,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ewc_lambda": args.ewc_lambda,
            "ewc_decay": args.ewc_decay,
            "agem_sample_size": args.agem_sample_size,
            "der_alpha": args.der_alpha,
            "der_beta": args.der_beta,
            "lwf_alpha": args.lwf_alpha,
            "lwf_temperature": args.lwf_temperature,
        },
        "strategies": {},
    }
    for name in args.strategies:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        model = build_mlp(Xe.shape[1], n_classes)
        t0 = time.perf_counter()
        strategy = make_strategy(name, model, args, n_files)
        for exp in bench.train_stream:
            strategy.train(exp)
        net = strategy.model  # GDumb trains a fresh copy of the initial model at every experience
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(Xe[lo : lo + 4096]) for lo in range(0, len(Xe), 4096)]).argmax(1).numpy()
        seconds = time.perf_counter() - t0
        res = {**classification_metrics(ye, pred, n_classes), "seconds": seconds}
        results["strategies"][name] = res
        print(
            f"  {name:<24} macro-F1 {res['macro_f1']:.3f}  accuracy {res['accuracy']:.3f}  [{seconds:.0f} s]",
            flush=True,
        )
        with open(args.out, "w") as f:  # after every strategy: a killed run keeps what it finished
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
