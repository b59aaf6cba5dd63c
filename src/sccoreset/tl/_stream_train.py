"""`tl.stream_train`: train on a stream of files in bounded memory and return the coreset as AnnData."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .._config import StreamConfig, option_fields, options_doc
from .._utils import logger
from ..pp._gene_space import GeneSpace
from ._events import EventStream, stream_events
from ._session import describe


def stream_train(
    files: Sequence[Any] | Any,
    label_key: str,
    *,
    gene_space: GeneSpace | None = None,
    classes: Sequence[str] | None = None,
    model: torch.nn.Module | None = None,
    eval_data: Any = None,
    config: StreamConfig | None = None,
    **options: Any,
) -> AnnData:
    """Train a classifier on a stream of files in bounded memory and return the coreset as AnnData.

        For each chunk of ``chunk_size`` cells: merge it with the buffer of ``buffer_size`` cells, train
        ``epochs_per_step`` epochs while recording per-cell training dynamics, keep ``buffer_size`` cells
        by those dynamics (class-stratified), evaluate; the next chunk is read and transformed in the
        background meanwhile. Peak memory is a few chunks plus the buffer plus the model (see
        ``docs/memory.md`` for the measured formula), whatever the number of cells.

        The defaults are the configuration that wins ``benchmarks/bench_accuracy.py`` on a
        class-incremental stream: ``rule="coverage"`` keeps cells spread evenly over the AUM range after
        dropping the hardest 10% (likely mislabelled or ambiguous cells); ``class_budget="balanced"`` gives
        every class seen so far an equal share, so classes absent from recent chunks are not squeezed out;
        ``max_chunk_fraction=0.3`` keeps every class's cells spread over at least four chunks, so the
        coreset spans the files' batch effects; ``balance_loss`` weights the loss by inverse class
        frequency in each merged set; ``distill`` replays the logits stored with each buffer cell (dark
        experience replay); ``final_epochs`` consolidates on the final buffer.

    Parameters
    ----------
        files
            Paths to ``.h5ad`` / ``.h5mu`` files or ``.zarr`` stores, or AnnData / MuData objects (in memory or backed).
        label_key
            obs column with the labels to learn.
        gene_space
            A fitted :class:`~sccoreset.pp.GeneSpace`; fitted with ``n_top_genes`` in one extra pass if None.
        classes
            The label set; read from the files (metadata pass) if None. A label in the files that is not
            in a given set is an error naming the file.
        model
            Any ``torch.nn.Module`` mapping features to logits; default an MLP with ``hidden`` layers.
        eval_data
            Held-out AnnData / files with the same ``label_key``, evaluated after every step.
        config
            A :class:`~sccoreset.tl.StreamConfig`; keyword options given beside it replace its fields.
    {options}

    Returns
    -------
        The coreset: ``X`` the features of the kept cells on the gene list, ``layers["counts"]`` their raw
        counts on the same genes, ``obs`` their original obs plus ``{key_added}_file``, ``_row``, ``_chunk``,
        ``_step_added`` and the score columns (``_aum``, ``_confidence``, ``_variability``, ``_forgetting``,
        ``_loss``), ``uns[key_added]`` the parameters, classes, gene space, per-step history and the model.

        With ``genes="all"``, ``X`` holds instead the kept cells' raw counts on every gene of the files
        (the union of their genes in order of first appearance; float32 CSR, read back from the files, from
        ``layer`` when one is given), so scanpy's ``normalize_total``, ``log1p`` and ``rank_genes_groups``
        work on the coreset as on any counts AnnData, and :func:`~sccoreset.tl.predict` takes it as new data.
        A gene that a file lacks is zeros for that file's cells: ``uns[key_added]["genes_missing_per_file"]``
        counts the union genes each file lacks, ``var[f"{key_added}_n_files"]`` the files that have each
        gene, and a ``MissingGenesWarning`` names the files that lack some. ``var["highly_variable"]``
        marks the gene list (``mean``/``std`` are NaN for the other genes); the features go to
        ``obsm[f"{key_added}_features"]`` (dense float32, columns in the order of
        ``uns[key_added]["gene_space"]["genes"]``); there is no ``layers["counts"]``.

    Examples
    --------
        >>> import sccoreset as scc
        >>> stream = scc.datasets.pbmc_stream(tmp_dir, n_files=3)
        >>> coreset = scc.tl.stream_train(stream.files, stream.label_key, chunk_size=200, buffer_size=60, progress=False)
        >>> coreset.n_obs
        60
    """
    cfg = StreamConfig.from_options(config, **options)
    with (
        EventStream(files, label_key, cfg, gene_space=gene_space, classes=classes, model=model, eval_data=eval_data)
        as events,
        tqdm(
            total=events.n_steps, initial=events.run.loop.step, desc="stream_train", unit="chunk",
            disable=not cfg.progress,
        ) as bar,
    ):  # fmt: skip
        for event in events:
            if event["step"] in ("final", "refit"):
                continue
            bar.update(1)
            if "macro_f1" in event:
                bar.set_postfix(macro_f1=f"{event['macro_f1']:.3f}", acc=f"{event['accuracy']:.3f}")
            logger.info(describe(event))
        return events.run.coreset()


def with_options_signature(fn):
    """``fn``'s signature with every option of :class:`StreamConfig` spelled out (for help() and IDEs)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in option_fields()
    ]
    fn.__signature__ = inspect.signature(fn).replace(parameters=params)
    return fn


stream_train.__doc__ = stream_train.__doc__.replace("    {options}", options_doc("    "))
with_options_signature(stream_train)
with_options_signature(stream_events)
