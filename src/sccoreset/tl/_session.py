"""One streaming-coreset run over opened sources: preparation, the event loop, checkpoints and the coreset.

:func:`sccoreset.tl.stream_train` is a thin sink over :class:`StreamRun`: prepare, iterate the events,
assemble the coreset. Everything AnnData-facing of a run lives here; the loop itself is the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._config import StreamConfig
from .._engine._distributed import barrier, broadcast_object, rank_world, shard_plan
from .._engine._events import History, StepEvent
from .._engine._herding import refuse_distributed
from .._engine._loop import ChunkData, StreamLoop
from .._engine._model import build_model, mlp_spec
from .._engine._refit import HeadRefit
from .._engine._train import model_device
from .._errors import InputError
from .._io._checks import warn_if_not_counts
from .._io._open_files import each_bounded
from .._io._sources import Source, open_sources
from .._utils import as_rng, logger
from ..pp._chunk_plan import plan_chunks
from ..pp._chunks import ChunkReader
from ..pp._fit import fit_sources
from ..pp._gene_space import GeneSpace
from ..pp._scan import scan_sources
from ..pp._weights import source_weights
from ._checkpoint import check_same_run, files_fingerprint, read_checkpoint, write_checkpoint
from ._coreset import build_coreset
from ._device import resolve_device


def eval_arrays(
    eval_data: Any, gene_space: GeneSpace, label_keys: Sequence[str], tasks: Sequence[Sequence[str]], cfg: StreamConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Features and integer targets ``(n, n_tasks)`` of the evaluation data (AnnData/MuData or paths)."""
    with open_sources(eval_data, mod=cfg.mod, layer=cfg.layer) as sources:
        reader = ChunkReader(
            sources, gene_space, list(label_keys), missing_labels=cfg.missing_labels, n_workers=cfg.n_workers
        )
        chunks = [reader.read(0, [(f, 0, s.n_obs)]) for f, s in enumerate(sources)]
    X = np.concatenate([c.X for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    targets = np.empty(labels.shape, dtype=np.int64)
    for t, (key, classes) in enumerate(zip(label_keys, tasks, strict=True)):
        lookup = pd.Index(classes)
        targets[:, t] = lookup.get_indexer(labels[:, t])
        unknown = sorted(set(labels[targets[:, t] < 0, t]))
        if unknown:
            raise InputError(f"eval_data: obs[{key!r}] holds labels the training stream does not have: {unknown[:10]}.")
    return X, targets


def as_label_keys(label_key: Any) -> list[str]:
    """``label_key`` as a list of obs keys, one per task (a single key is one task)."""
    keys = [label_key] if isinstance(label_key, str) else label_key
    if not isinstance(keys, Sequence) or isinstance(keys, str) or not keys:
        raise InputError(f"label_key must be an obs key or a list of obs keys, got {label_key!r}.")
    keys = list(keys)
    if not all(isinstance(k, str) and k for k in keys):
        raise InputError(f"label_key must be an obs key or a list of obs keys, got {label_key!r}.")
    if len(set(keys)) < len(keys):
        raise InputError(f"label_key lists a key twice: {keys}.")
    return keys


def given_classes(classes: Any, label_keys: Sequence[str]) -> list[list[str] | None]:
    """The label set given for each task: a sequence (one task) or a dict by label key (any task may be absent)."""
    if classes is None:
        return [None] * len(label_keys)
    if isinstance(classes, Mapping):
        unknown = sorted(set(classes) - set(label_keys))
        if unknown:
            raise InputError(
                f"classes names keys that are not label keys: {unknown}; the label keys are {list(label_keys)}."
            )
        return [None if classes.get(k) is None else [str(c) for c in classes[k]] for k in label_keys]
    if len(label_keys) > 1:
        raise InputError("classes: with several label keys, give a dict {label key: classes}.")
    return [[str(c) for c in classes]]


class Budget:
    """The classes selection balances: one task's classes, or the combinations of several tasks' classes."""

    def __init__(self, keys: Sequence[str], label_keys: Sequence[str], tasks: Sequence[Sequence[str]]) -> None:
        unknown = [k for k in keys if k not in label_keys]
        if unknown:
            raise InputError(f"budget_key {unknown} must be among the label keys {list(label_keys)}.")
        self.keys = list(keys)
        self.tasks = [list(label_keys).index(k) for k in keys]
        self.sizes = [len(tasks[t]) for t in self.tasks]
        self.n_classes = int(np.prod(self.sizes))
        if self.n_classes > 1_000_000:
            raise InputError(f"budget_key {self.keys}: {self.n_classes} combinations of classes; at most 1,000,000.")
        if len(self.tasks) == 1:
            self.names = list(tasks[self.tasks[0]])
        else:
            grids = np.meshgrid(*[np.arange(c) for c in self.sizes], indexing="ij")
            self.names = [
                " | ".join(tasks[t][i] for t, i in zip(self.tasks, combo, strict=True))
                for combo in zip(*[g.ravel() for g in grids], strict=True)
            ]

    def codes(self, targets: np.ndarray) -> np.ndarray:
        """Budget class of each cell from its targets ``(n, n_tasks)`` (mixed radix over the budget's tasks)."""
        code = np.zeros(targets.shape[0], dtype=np.int64)
        for t, size in zip(self.tasks, self.sizes, strict=True):
            code = code * size + targets[:, t]
        return code


def check_model(model: torch.nn.Module, n_genes: int, n_classes: int) -> None:
    """The model maps ``n_genes`` features to ``n_classes`` logits (all tasks' heads; tried on its own device)."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(2, n_genes, device=model_device(model)))
            model.train(was)
    except Exception as e:
        raise InputError(f"model: cannot map {n_genes} features (the gene list) to logits ({e}).") from e
    if out.ndim != 2 or out.shape[1] != n_classes:
        raise InputError(
            f"model: outputs shape {tuple(out.shape[1:])} per cell, but there are {n_classes} classes "
            "(over all tasks: one logit per class of every label key, concatenated in order)."
        )


class StreamRun:
    """A prepared run: sources scanned, gene space fitted, model built, chunk plan made, checkpoint restored."""

    def __init__(
        self,
        sources: Sequence[Source],
        label_key: str | Sequence[str],
        cfg: StreamConfig,
        *,
        gene_space: GeneSpace | None = None,
        classes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        model: torch.nn.Module | None = None,
        eval_data: Any = None,
    ) -> None:
        self.t_start = time.perf_counter()
        self.sources, self.cfg = list(sources), cfg
        self.label_keys = as_label_keys(label_key)
        self.label_key = self.label_keys[0]
        self.device = resolve_device(cfg.device)
        rng = as_rng(cfg.random_state)
        self.tasks: list[list[str]] = []
        for key, given in zip(self.label_keys, given_classes(classes, self.label_keys), strict=True):
            info = scan_sources(self.sources, key, given, missing_labels=cfg.missing_labels)
            self.tasks.append(given if given is not None else info.labels)
            if len(self.tasks[-1]) < 2:
                raise InputError(f"obs[{key!r}]: need at least 2 classes to train, found {self.tasks[-1]}.")
        self.n_obs_per_file = info.n_obs  # cells of each file (the same whichever key scanned them)
        self.budget = Budget(cfg.budget_key or self.label_keys[:1], self.label_keys, self.tasks)
        self.classes = self.tasks[0]
        combos = len(self.budget.keys) > 1
        # the files' cells per budget class: the coreset's weights under order="weighted" (draws repeat cells)
        self.file_totals = self._budget_totals() if cfg.order == "weighted" or (combos and cfg.min_per_class) else None
        n_budget = self.budget.n_classes
        if combos and self.file_totals is not None:  # only the combinations the files hold need a floor
            n_budget = int((self.file_totals > 0).sum())
        if cfg.min_per_class * n_budget > cfg.buffer_size:
            raise InputError(
                f"buffer_size ({cfg.buffer_size}) is smaller than the number of classes ({n_budget}) "
                f"times min_per_class ({cfg.min_per_class})."
            )
        self.rank, self.world = rank_world()
        if self.world > 1:  # options of one process: refused before the gene-space pass and any training
            if cfg.refit_heads:
                raise InputError(f"refit_heads runs in one process; under torch.distributed (world size "
                                 f"{self.world}) leave it at 0.")  # fmt: skip
            if cfg.rule == "herding":
                refuse_distributed(self.world)
        self.fingerprint = files_fingerprint(self.sources)
        saved = read_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
        if saved is not None:
            gene_space = self._check_resume(saved, gene_space)
        if gene_space is None:
            # under DDP rank 0 fits the gene space and hands it to the others
            if self.rank == 0:
                gene_space = fit_sources(
                    self.sources,
                    n_top_genes=cfg.n_top_genes,
                    progress=cfg.progress,
                    n_workers=cfg.n_workers,
                    max_cells=cfg.gene_space_cells,
                    random_state=cfg.random_state_key() if isinstance(cfg.random_state, int) else 0,
                )
            gene_space = broadcast_object(gene_space)
        else:
            warn_if_not_counts(self.sources)
        self.gene_space = gene_space
        # on a GPU the reader writes chunks into pinned memory, so uploads are asynchronous DMA copies
        self.reader = ChunkReader(
            self.sources, gene_space, self.label_keys, missing_labels=cfg.missing_labels, n_workers=cfg.n_workers,
            pin_memory=str(self.device).startswith("cuda"), obs_names=False,
        )  # fmt: skip
        for f in range(len(self.sources)):
            self.reader.col_map(f)  # gene alignment errors before any training
        eval_set = None
        if eval_data is not None:
            eval_set = eval_arrays(eval_data, gene_space, self.label_keys, self.tasks, cfg)
        self.spec: dict | None = None
        n_out = sum(len(t) for t in self.tasks)
        if model is None:
            self.spec = mlp_spec(gene_space.n_genes, n_out, cfg.hidden)
            torch.manual_seed(int(rng.integers(2**62)))
            model = build_model(self.spec)
        else:
            check_model(model, gene_space.n_genes, n_out)
        self.model = model

        # order="weighted": per-cell weights balancing weight_key (default: the label key), read from obs only
        self.plan = plan_chunks(
            self.n_obs_per_file, cfg.chunk_size, order=cfg.order, block_size=cfg.block_size, rng=rng, n_draws=cfg.n_draws,
            weights=source_weights(self.sources, cfg.weight_key or label_key, baseline=cfg.weight_baseline)[0]
            if cfg.order == "weighted" else None,
        )  # fmt: skip
        self.events: list[StepEvent] = []
        if saved is not None:
            model.load_state_dict(saved["model"])
            self.plan = [[tuple(seg) for seg in chunk] for chunk in saved["plan"]]
            self.events = list(saved["events"])
        self.prepare_seconds = None
        self.loop = StreamLoop(
            model, cfg, n_classes=self.budget.n_classes, task_sizes=[len(t) for t in self.tasks],
            device=self.device, eval_set=eval_set, rng=rng,
            resume=None if saved is None else saved["engine"], feature_scale=gene_space.std,
        )  # fmt: skip
        self.prepare_seconds = time.perf_counter() - self.t_start

    def _budget_totals(self) -> np.ndarray:
        """Cells of every budget class in the files (obs only; cells missing any label are left out, as in training)."""
        totals = np.zeros(self.budget.n_classes, dtype=np.int64)
        lookups = [pd.Index(t) for t in self.tasks]
        for src in each_bounded(self.sources):
            cols = [src.read_labels(key) for key in self.label_keys]
            missing = np.logical_or.reduce([m for _, m in cols])
            targets = np.stack([lk.get_indexer(v[~missing]) for lk, (v, _) in zip(lookups, cols, strict=True)], 1)
            totals += np.bincount(self.budget.codes(targets), minlength=self.budget.n_classes)
        return totals

    def params(self) -> dict[str, str]:
        """What a resume must match: the compared options and the number of ranks."""
        return {**self.cfg.comparable(), "world_size": repr(self.world)}

    def _check_resume(self, saved: dict[str, Any], gene_space: GeneSpace | None) -> GeneSpace:
        check_same_run(saved, self.params(), self.fingerprint, Path(self.cfg.checkpoint_dir))
        if list(saved["classes"]) != self.classes or list(saved.get("tasks", [self.classes])) != self.tasks:
            raise InputError(f"resume: the checkpoint's classes {list(saved['classes'])} differ from {self.classes}.")
        stored = GeneSpace.from_dict(saved["gene_space"])
        if gene_space is not None and list(gene_space.genes) != list(stored.genes):
            raise InputError("resume: gene_space differs from the one the checkpoint was made with.")
        logger.info(f"resuming from {self.cfg.checkpoint_dir} at step {saved['engine']['step']}")
        return stored

    @property
    def prefetch(self) -> int:
        """Chunks read ahead while the model trains: ``cfg.prefetch``, else 1 on a GPU and 0 on a CPU.

        On a CPU, training's threads use every core; reading threads beside them slow both (measured
        on 2 cores: 15-30% longer runs), so chunks are read between steps, in parallel.
        """
        if self.cfg.prefetch is not None:
            return self.cfg.prefetch
        return 0 if torch.device(self.device).type == "cpu" else 1

    @property
    def n_steps(self) -> int:
        return len(self.plan)

    @property
    def chunk_sizes(self) -> list[int]:
        """Cells planned in each step."""
        return [sum(stop - start for _, start, stop in chunk) for chunk in self.plan]

    def _chunks(self) -> Iterator[ChunkData]:
        lookups = [pd.Index(t) for t in self.tasks]
        plan = shard_plan(self.plan, self.rank, self.world) if self.world > 1 else self.plan
        for chunk in self.reader.iterate(plan, start=self.loop.step, prefetch=self.prefetch):
            targets = chunk_targets(chunk.labels, lookups)
            prov = {"file": chunk.file_index.astype(np.int64), "row": chunk.row}
            yield ChunkData(chunk.index, chunk.X, self.budget.codes(targets), prov,
                            n_skipped=int(getattr(chunk, "n_skipped", 0)), targets=targets)  # fmt: skip

    def events_iter(self) -> Iterator[StepEvent]:
        """Step events, then the final consolidation's; checkpoints written as configured."""
        for event in self.loop.steps(self._chunks()):
            self.events.append(event)
            self._maybe_checkpoint()
            yield event
        final = self.loop.finish()
        if final is not None:
            self.events.append(final)
            yield final
            for p in range(self.cfg.refit_heads):
                event = self._refit_pass(p)
                self.events.append(event)
                yield event

    def _refit_pass(self, p: int) -> StepEvent:
        """One more read of the files, in block-shuffled order, that retrains only the heads (``refit_heads``)."""
        t0 = time.perf_counter()
        loop = self.loop
        if p == 0:
            self._refit = HeadRefit(loop.model, loop.objective, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                                    generator=loop.generator)  # fmt: skip
        plan = plan_chunks(self.n_obs_per_file, self.cfg.chunk_size, order="block_shuffle", block_size=self.cfg.block_size,
                           rng=loop.rng)  # fmt: skip
        lookups = [pd.Index(t) for t in self.tasks]
        losses, sizes, wait = [], [], 0.0
        chunks = self.reader.iterate(plan, start=0, prefetch=self.prefetch)
        try:
            while True:
                t1 = time.perf_counter()
                chunk = next(chunks, None)
                wait += time.perf_counter() - t1
                if chunk is None:
                    break
                targets = chunk_targets(chunk.labels, lookups)
                losses.append(self._refit.fit_chunk(torch.from_numpy(chunk.X).to(loop.device), targets))
                sizes.append(len(targets))
        finally:  # stopped early or failed: the reading threads stop
            chunks.close()
        mean = float(np.average(losses, weights=sizes)) if sizes else float("nan")
        event = loop.make_event("refit", None, [mean])
        event.update(wait_seconds=wait, train_seconds=time.perf_counter() - t0 - wait, select_seconds=0.0,
                     eval_seconds=0.0, refit_pass=p, n_chunk=int(sum(sizes)))  # fmt: skip
        return event

    def _maybe_checkpoint(self) -> None:
        cfg, step = self.cfg, self.loop.step
        if cfg.checkpoint_dir is None or (step % cfg.checkpoint_every and step != len(self.plan)):
            return
        state = self.loop.state()  # every rank: it gathers the ranks' generators
        if self.rank == 0:
            write_checkpoint(
                cfg.checkpoint_dir,
                {
                    "params": self.params(), "files": self.fingerprint, "classes": self.classes, "tasks": self.tasks,
                    "gene_space": self.gene_space.to_dict(), "plan": self.plan, "model": self.model.state_dict(),
                    "engine": state, "events": self.events,
                },
            )  # fmt: skip
        barrier()

    def coreset(self) -> AnnData:
        """The current buffer as the coreset AnnData (valid after any number of steps, at least one)."""
        if self.loop.buffer is None:
            raise InputError("the stream yielded no chunk: there is no coreset to build.")
        params = {
            **self.cfg.to_uns(), "device": str(self.device), "world_size": self.world, "prefetch": self.prefetch,
            "precision": self.loop.precision, "wall_seconds": time.perf_counter() - self.t_start, "prepare_seconds": self.prepare_seconds,
        }  # fmt: skip
        t0 = time.perf_counter()
        # the stream's cells per budget class; under order="weighted" (draws repeat cells) the files'
        totals = self.file_totals if self.cfg.order == "weighted" else self.loop.seen_counts
        adata = build_coreset(
            self.sources, self.loop.buffer,
            History.from_events(self.events, self.budget.n_classes, self.label_keys if len(self.tasks) > 1 else None),
            gene_space=self.gene_space, classes=self.classes, label_key=self.label_key, model=self.model,
            tasks=dict(zip(self.label_keys, self.tasks, strict=True)), budget=self.budget,
            spec=self.spec, params=params, key_added=self.cfg.key_added, class_totals=totals,
            genes=self.cfg.genes,
        )  # fmt: skip
        adata.uns[self.cfg.key_added]["params"]["coreset_seconds"] = time.perf_counter() - t0
        return adata


def chunk_targets(labels: Any, lookups: Sequence[pd.Index]) -> np.ndarray:
    """Integer targets ``(n, n_tasks)`` of a chunk's labels (every label is in the scanned set; a share may be empty)."""
    labels = np.asarray(labels, dtype=object).reshape(-1, len(lookups))
    targets = np.empty(labels.shape, dtype=np.int64)
    for t, lookup in enumerate(lookups):
        targets[:, t] = lookup.get_indexer(labels[:, t])
    return targets


def describe(event: StepEvent) -> str:
    s = f"step {event['step']}: loss {event['train_loss']:.3f}"
    if "macro_f1" in event:
        s += f", accuracy {event['accuracy']:.3f}, macro-F1 {event['macro_f1']:.3f}"
    return s
