"""The command line: ``python -m sccoreset train`` and ``python -m sccoreset predict``, for batch jobs and clusters.

Every option of :class:`~sccoreset.tl.StreamConfig` becomes a ``--dashed-flag`` of ``train``, made from the
dataclass fields (type, default and one-line documentation), so a new option needs no change here.
Under ``torchrun`` (``WORLD_SIZE > 1``) ``train`` initialises ``torch.distributed`` around the run and only
rank 0 writes ``--out``. Outputs are written atomically: a temporary file in the same folder, then
:func:`os.replace`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._cli_flags import add_config_flags, config_options, flag  # noqa: F401 (flag: part of the CLI's API)
from ._cli_io import check_out, process_group, read_gene_space, write_h5ad_atomic
from ._config import StreamConfig
from ._errors import InputError
from ._utils import logger

PROG = "sccoreset"
USAGE_ERROR = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    """The ``sccoreset`` parser with its ``train`` and ``predict`` subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Train classifiers on streams of .h5ad files and annotate cells with them."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,predict}")

    train = sub.add_parser(
        "train",
        help="stream files through a classifier and write the coreset (.h5ad)",
        description="Train a classifier on a stream of files in bounded memory and write the coreset as .h5ad "
        "(sccoreset.tl.stream_train). Under torchrun (WORLD_SIZE > 1) it runs in a torch.distributed process "
        "group, stream_train trains data-parallel, and rank 0 writes --out.",
    )
    train.add_argument("files", nargs="+", metavar="FILE", help="training files (.h5ad, .h5mu, .zarr), in stream order")
    train.add_argument(
        "--label-key", required=True, metavar="KEY[,KEY...]", type=lambda text: text.split(","),
        help="obs column with the labels to learn; several, comma-separated, train one head per task",
    )  # fmt: skip
    train.add_argument("--out", required=True, type=Path, help="where to write the coreset (.h5ad)")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    train.add_argument(
        "--gene-space",
        type=Path,
        metavar="PATH",
        help="a coreset .h5ad whose gene space (uns['sccoreset']['gene_space']) to reuse instead of fitting one",
    )
    train.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out files evaluated after every step")
    train.add_argument(
        "--classes", nargs="+", metavar="CLASS", help="the label set (default: every label found in the files)"
    )
    _add_logging_flags(train)
    add_config_flags(train)
    train.set_defaults(run=_train)

    predict = sub.add_parser(
        "predict",
        help="label the cells of a file with a coreset's classifier",
        description="Annotate the cells of FILE with the classifier stored in a coreset (sccoreset.tl.predict) "
        "and write the annotated file.",
    )
    predict.add_argument("file", metavar="FILE", help="cells to annotate (.h5ad with raw counts)")
    predict.add_argument("--coreset", required=True, type=Path, help="the coreset .h5ad written by 'train'")
    predict.add_argument("--out", required=True, type=Path, help="where to write the annotated .h5ad")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    predict.add_argument(
        "--key-added", default="sccoreset", help="prefix of the obs/obsm/uns outputs (default: %(default)s)"
    )
    predict.add_argument("--layer", help="read counts from this layer instead of X")
    predict.add_argument("--device", help="'cuda', 'cpu', ... (default: CUDA when available)")
    predict.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass (default: %(default)s)")
    predict.add_argument("--over-clustering", metavar="COL", help="obs column of a clustering for --majority-voting")
    predict.add_argument(
        "--majority-voting", action="store_true", help="also label each cell by the majority prediction of its cluster"
    )
    _add_logging_flags(predict)
    predict.set_defaults(run=_predict)
    return parser


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper, help="(default: INFO)")
    parser.add_argument(
        "--quiet", action="store_true", help="only warnings and errors: no progress bar, step log or summary"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    with _logging(logging.WARNING if ns.quiet else getattr(logging, ns.log_level)):
        try:
            return ns.run(ns)
        except InputError as e:
            print(f"{PROG} {ns.command}: error: {e}", file=sys.stderr)
            return USAGE_ERROR
        except KeyboardInterrupt:
            print(f"{PROG} {ns.command}: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _logging(level: int) -> Iterator[None]:
    """Log the package's messages to stderr for the duration of a command."""
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where}: %(message)s", "%H:%M:%S"))
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


# -- train ---------------------------------------------------------------------------------------
def _train(ns: argparse.Namespace) -> int:
    from .tl import stream_train

    options = config_options(ns)
    if ns.quiet:
        options.setdefault("progress", False)
    StreamConfig.from_options(**options)  # bad values fail here, before any file is read
    check_out(ns.out, overwrite=ns.overwrite)
    gene_space = read_gene_space(ns.gene_space) if ns.gene_space is not None else None
    with process_group(options) as (rank, world):
        if rank != 0:
            options["progress"] = False
            logger.setLevel(max(logger.level, logging.WARNING))
        t0 = time.perf_counter()
        coreset = stream_train(
            [str(f) for f in ns.files],
            ns.label_key[0] if len(ns.label_key) == 1 else ns.label_key,
            gene_space=gene_space,
            classes=ns.classes,
            eval_data=None if ns.eval_data is None else [str(f) for f in ns.eval_data],
            **options,
        )
        wall = time.perf_counter() - t0
        if rank == 0:
            write_h5ad_atomic(coreset, ns.out, overwrite=ns.overwrite)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    if rank == 0 and not ns.quiet:
        print(train_summary(coreset, wall, ns.out, key_added=options.get("key_added", "sccoreset"), world=world))
    return 0


def train_summary(coreset: Any, wall: float, out: Path, *, key_added: str, world: int = 1) -> str:
    """A few lines on the finished run: cells streamed, coreset size, wall time, final macro-F1."""
    rec = coreset.uns.get(key_added, {})
    hist = rec.get("history", {})
    n_chunk = hist.get("n_chunk", [])
    f1 = None
    final = hist.get("final")
    if isinstance(final, typing.Mapping) and "macro_f1" in final:
        f1 = float(final["macro_f1"])
    elif len(hist.get("macro_f1", [])):
        f1 = float(hist["macro_f1"][-1])
    lines = [
        f"streamed {int(sum(n_chunk)):,} cells in {len(n_chunk)} steps"
        + (f" on {world} processes" if world > 1 else ""),
        f"coreset: {coreset.n_obs:,} cells x {coreset.n_vars:,} genes, {len(rec.get('classes', []))} classes",
        f"wall time: {wall:.1f} s",
    ]
    if f1 is not None:
        lines.append(f"final macro-F1 on eval data: {f1:.3f}")
    lines.append(f"wrote {out}")
    return "\n".join(lines)


# -- predict -------------------------------------------------------------------------------------
def _predict(ns: argparse.Namespace) -> int:
    import anndata

    from .tl import predict

    check_out(ns.out, overwrite=ns.overwrite)
    for name, path in (("FILE", Path(ns.file)), ("--coreset", ns.coreset)):
        if not path.is_file():
            raise InputError(f"{name} {path}: file not found.")
    coreset = anndata.read_h5ad(ns.coreset, backed="r")  # predict needs uns only
    try:
        adata = anndata.read_h5ad(ns.file)
        predict(
            adata,
            coreset,
            layer=ns.layer,
            device=ns.device,
            batch_size=ns.batch_size,
            key_added=ns.key_added,
            over_clustering=ns.over_clustering,
            majority_voting=ns.majority_voting,
        )
    finally:
        coreset.file.close()
    write_h5ad_atomic(adata, ns.out, overwrite=ns.overwrite)
    if not ns.quiet:
        pred = adata.obs[f"{ns.key_added}_prediction"]
        top = ", ".join(f"{k} {v:,}" for k, v in pred.value_counts().head(5).items())
        conf = adata.obs[f"{ns.key_added}_confidence"]
        print(
            f"predicted {adata.n_obs:,} cells ({top}{', ...' if pred.nunique() > 5 else ''}); "
            f"mean confidence {conf.mean() if len(conf) else float('nan'):.3f}\nwrote {ns.out}"
        )
    return 0


# -- writing -------------------------------------------------------------------------------------
