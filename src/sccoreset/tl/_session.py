"""One streaming-coreset run over opened sources: preparation, the event loop, checkpoints and the coreset.

:func:`sccoreset.tl.stream_train` is a thin sink over :class:`StreamRun`: prepare, iterate the events,
assemble the coreset. Everything AnnData-facing of a run lives here; the loop itself is the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._config import StreamConfig
from .._engine._distributed import barrier, broadcast_object, rank_world, shard_plan
from .._engine._events import History, StepEvent
from .._engine._loop import ChunkData, StreamLoop
from .._engine._model import build_model, mlp_spec
from .._engine._train import model_device
from .._errors import InputError
from .._io._checks import warn_if_not_counts
from .._io._sources import Source, open_sources
from .._utils import as_rng, logger
from ..pp._chunk_plan import plan_chunks
from ..pp._chunks import ChunkReader
from ..pp._fit import fit_sources
from ..pp._gene_space import GeneSpace
from ..pp._scan import scan_sources
from ._checkpoint import check_same_run, files_fingerprint, read_checkpoint, write_checkpoint
from ._coreset import build_coreset
from ._device import resolve_device


def eval_arrays(
    eval_data: Any, gene_space: GeneSpace, label_key: str, classes: Sequence[str], cfg: StreamConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Features and integer labels of the evaluation data (AnnData/MuData or paths)."""
    with open_sources(eval_data, mod=cfg.mod, layer=cfg.layer) as sources:
        reader = ChunkReader(sources, gene_space, label_key, missing_labels=cfg.missing_labels, n_workers=cfg.n_workers)
        chunks = [reader.read(0, [(f, 0, s.n_obs)]) for f, s in enumerate(sources)]
    X = np.concatenate([c.X for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise InputError(
            f"eval_data: obs[{label_key!r}] holds labels the training stream does not have: {unknown[:10]}."
        )
    return X, np.array([lookup[v] for v in labels], dtype=np.int64)


def check_model(model: torch.nn.Module, n_genes: int, n_classes: int) -> None:
    """The model maps ``n_genes`` features to ``n_classes`` logits (tried on its own device)."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(2, n_genes, device=model_device(model)))
            model.train(was)
    except Exception as e:
        raise InputError(f"model: cannot map {n_genes} features (the gene list) to logits ({e}).") from e
    if out.ndim != 2 or out.shape[1] != n_classes:
        raise InputError(f"model: outputs shape {tuple(out.shape[1:])} per cell, but there are {n_classes} classes.")


class StreamRun:
    """A prepared run: sources scanned, gene space fitted, model built, chunk plan made, checkpoint restored."""

    def __init__(
        self,
        sources: Sequence[Source],
        label_key: str,
        cfg: StreamConfig,
        *,
        gene_space: GeneSpace | None = None,
        classes: Sequence[str] | None = None,
        model: torch.nn.Module | None = None,
        eval_data: Any = None,
    ) -> None:
        self.t_start = time.perf_counter()
        self.sources, self.label_key, self.cfg = list(sources), label_key, cfg
        self.device = resolve_device(cfg.device)
        rng = as_rng(cfg.random_state)
        info = scan_sources(self.sources, label_key, classes, missing_labels=cfg.missing_labels)
        self.classes = [str(c) for c in classes] if classes is not None else info.labels
        if len(self.classes) < 2:
            raise InputError(f"obs[{label_key!r}]: need at least 2 classes to train, found {self.classes}.")
        if cfg.min_per_class * len(self.classes) > cfg.buffer_size:
            raise InputError(
                f"buffer_size ({cfg.buffer_size}) is smaller than the number of classes ({len(self.classes)}) "
                f"times min_per_class ({cfg.min_per_class})."
            )
        self.rank, self.world = rank_world()
        self.fingerprint = files_fingerprint(self.sources)
        saved = read_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
        if saved is not None:
            gene_space = self._check_resume(saved, gene_space)
        if gene_space is None:
            # under DDP rank 0 fits the gene space and hands it to the others
            if self.rank == 0:
                gene_space = fit_sources(
                    self.sources, n_top_genes=cfg.n_top_genes, progress=cfg.progress, n_workers=cfg.n_workers
                )
            gene_space = broadcast_object(gene_space)
        else:
            warn_if_not_counts(self.sources)
        self.gene_space = gene_space
        # on a GPU the reader writes chunks into pinned memory, so uploads are asynchronous DMA copies
        self.reader = ChunkReader(
            self.sources, gene_space, label_key, missing_labels=cfg.missing_labels, n_workers=cfg.n_workers,
            pin_memory=str(self.device).startswith("cuda"), obs_names=False,
        )  # fmt: skip
        for f in range(len(self.sources)):
            self.reader.col_map(f)  # gene alignment errors before any training
        eval_set = eval_arrays(eval_data, gene_space, label_key, self.classes, cfg) if eval_data is not None else None
        self.spec: dict | None = None
        if model is None:
            self.spec = mlp_spec(gene_space.n_genes, len(self.classes), cfg.hidden)
            torch.manual_seed(int(rng.integers(2**62)))
            model = build_model(self.spec)
        else:
            check_model(model, gene_space.n_genes, len(self.classes))
        self.model = model
        from ..pp._weights import source_weights  # TODO hoist to the module imports

        # order="weighted": per-cell weights balancing weight_key (default: the label key), read from obs only
        self.plan = plan_chunks(
            info.n_obs, cfg.chunk_size, order=cfg.order, block_size=cfg.block_size, rng=rng, n_draws=cfg.n_draws,
            weights=source_weights(self.sources, cfg.weight_key or label_key, baseline=cfg.weight_baseline)[0]
            if cfg.order == "weighted" else None,
        )  # fmt: skip
        self.events: list[StepEvent] = []
        if saved is not None:
            model.load_state_dict(saved["model"])
            self.plan = [[tuple(seg) for seg in chunk] for chunk in saved["plan"]]
            self.events = list(saved["events"])
        self.loop = StreamLoop(
            model, cfg, n_classes=len(self.classes), device=self.device, eval_set=eval_set, rng=rng,
            resume=None if saved is None else saved["engine"],
        )  # fmt: skip

    def params(self) -> dict[str, str]:
        """What a resume must match: the compared options and the number of ranks."""
        return {**self.cfg.comparable(), "world_size": repr(self.world)}

    def _check_resume(self, saved: dict[str, Any], gene_space: GeneSpace | None) -> GeneSpace:
        check_same_run(saved, self.params(), self.fingerprint, Path(self.cfg.checkpoint_dir))
        if list(saved["classes"]) != self.classes:
            raise InputError(f"resume: the checkpoint's classes {list(saved['classes'])} differ from {self.classes}.")
        stored = GeneSpace.from_dict(saved["gene_space"])
        if gene_space is not None and list(gene_space.genes) != list(stored.genes):
            raise InputError("resume: gene_space differs from the one the checkpoint was made with.")
        logger.info(f"resuming from {self.cfg.checkpoint_dir} at step {saved['engine']['step']}")
        return stored

    @property
    def n_steps(self) -> int:
        return len(self.plan)

    @property
    def chunk_sizes(self) -> list[int]:
        """Cells planned in each step."""
        return [sum(stop - start for _, start, stop in chunk) for chunk in self.plan]

    def _chunks(self) -> Iterator[ChunkData]:
        lookup = pd.Index(self.classes)
        plan = shard_plan(self.plan, self.rank, self.world) if self.world > 1 else self.plan
        for chunk in self.reader.iterate(plan, start=self.loop.step, prefetch=self.cfg.prefetch):
            y = lookup.get_indexer(chunk.labels).astype(np.int64)  # every label is in the scanned set
            prov = {"file": chunk.file_index.astype(np.int64), "row": chunk.row}
            yield ChunkData(chunk.index, chunk.X, y, prov, n_skipped=int(getattr(chunk, "n_skipped", 0)))

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

    def _maybe_checkpoint(self) -> None:
        cfg, step = self.cfg, self.loop.step
        if cfg.checkpoint_dir is None or (step % cfg.checkpoint_every and step != len(self.plan)):
            return
        state = self.loop.state()  # every rank: it gathers the ranks' generators
        if self.rank == 0:
            write_checkpoint(
                cfg.checkpoint_dir,
                {
                    "params": self.params(), "files": self.fingerprint, "classes": self.classes,
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
            **self.cfg.to_uns(), "device": str(self.device), "world_size": self.world,
            "wall_seconds": time.perf_counter() - self.t_start,
        }  # fmt: skip
        return build_coreset(
            self.sources, self.loop.buffer, History.from_events(self.events, len(self.classes)),
            gene_space=self.gene_space, classes=self.classes, label_key=self.label_key, model=self.model,
            spec=self.spec, params=params, key_added=self.cfg.key_added, class_totals=self.loop.seen_counts,
        )  # fmt: skip


def describe(event: StepEvent) -> str:
    s = f"step {event['step']}: loss {event['train_loss']:.3f}"
    if "macro_f1" in event:
        s += f", accuracy {event['accuracy']:.3f}, macro-F1 {event['macro_f1']:.3f}"
    return s
