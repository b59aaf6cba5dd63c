"""The streaming-coreset loop. Knows numpy and torch, nothing of AnnData.

:class:`StreamLoop` holds the loop's state (model, optimizer, buffer, counts, generators);
:meth:`StreamLoop.steps` turns chunks into step events, :meth:`StreamLoop.finish` consolidates
on the final buffer. At any moment ``loop.buffer`` is a valid coreset and :meth:`StreamLoop.state`
everything needed to continue.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._config import StreamConfig
from .._errors import InputError
from ._buffer import Buffer
from ._distributed import broadcast_parameters, concat_by_rank, gather_objects, gather_rows, rank_world, wrap_ddp
from ._dynamics import score_of
from ._events import StepEvent
from ._graphs import GraphedTrainer
from ._herding import ClassMeans, herd_classes, refuse_distributed
from ._metrics import classification_metrics
from ._objective import Objective, as_targets
from ._precision import training_precision
from ._selection import select
from ._train import make_optimizer, predict_logits, to_device, train_epochs


@dataclass
class ChunkData:
    """What the engine needs of a chunk: features, integer labels, and provenance arrays.

    ``y`` holds each cell's budget class (what selection balances); ``targets`` the training labels,
    one column per task (default ``y`` as the one task).
    """

    index: int
    X: np.ndarray
    y: np.ndarray
    provenance: dict[str, np.ndarray]
    n_skipped: int = 0
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.y[:, None]


class StreamLoop:
    """State and steps of the streaming-coreset loop.

    Parameters
    ----------
    model
        Maps features to ``n_classes`` logits; moved to ``device``.
    cfg
        The run's options.
    n_classes
        Size of the label set (of the budget classes in a multi-task run).
    task_sizes
        Classes of each task in a multi-task run (the model outputs their logits concatenated); default
        one task of ``n_classes``.
    device
        Training device.
    eval_set
        Held-out (features, integer labels ``(n,)`` or ``(n, n_tasks)``) evaluated after every step.
    rng
        Drives selection and the seeds of torch's generators.
    resume
        A :meth:`state` to continue from (the model's weights restored by the caller).
    feature_scale
        Rule ``"herding"``: per-feature factors mapping the features to the space whose class means the kept
        cells track (the gene space's standard deviations: log-normalised expression); None: the features.
    """

    look_ahead = True  # on a GPU, fetch and upload the next chunk while training (tests turn it off)

    def __init__(
        self,
        model: nn.Module,
        cfg: StreamConfig,
        *,
        n_classes: int,
        task_sizes: list[int] | None = None,
        device: str | torch.device = "cpu",
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
        rng: np.random.Generator,
        resume: dict[str, Any] | None = None,
        feature_scale: np.ndarray | None = None,
    ) -> None:
        self.cfg = cfg
        self.n_classes = n_classes
        self.device = torch.device(device)
        self.rank, self.world = rank_world()
        self.model = model.to(self.device)
        self.regularizer = None
        if cfg.regularizer != "none":
            from ._regularizers import make_regularizer

            self.regularizer = make_regularizer(cfg)
        # CUDA graphs for the built-in step; under DDP (NCCL) the graph all-reduces the gradients itself.
        # Models with buffers (BatchNorm's running statistics) train eagerly: the graphs' padding rows would
        # enter their batch statistics, and DDP's per-forward buffer broadcast cannot be replayed
        self.use_graphs = (
            self.device.type == "cuda" and cfg.cuda_graphs and cfg.loss is None and self.regularizer is None
            and cfg.step_patience is None and (self.world == 1 or torch.distributed.get_backend() == "nccl")
            and next(self.model.buffers(), None) is None
        )  # fmt: skip
        if self.use_graphs:  # what trains is the model itself; the ranks start from rank 0's weights
            broadcast_parameters(self.model)
            self.net = self.model
        else:  # DDP over the ranks, or the model itself
            self.net = wrap_ddp(self.model, self.device)
        self.optimizer = make_optimizer(self.model, cfg.lr)
        self.precision = training_precision(self.device, cfg.cpu_bf16)  # what the eager step multiplies in
        self.objective = Objective(task_sizes or [n_classes], balance_loss=cfg.balance_loss, loss=cfg.loss)
        self.n_logits = self.objective.n_logits
        self.generator = torch.Generator()
        self.rng = rng
        self.eval_set = None
        if eval_set is not None:
            self.eval_set = (
                to_device(torch.from_numpy(np.ascontiguousarray(eval_set[0])), self.device),
                as_targets(np.asarray(eval_set[1])),
            )
        self.buffer: Buffer | None = None
        self._graphed: GraphedTrainer | None = None
        self._ahead = None  # the next chunk, fetched while the GPU trained: (chunk, wait, (features, copy event))
        self._ahead_wait = 0.0
        self._copy_stream = None
        self._merge_workspace: torch.Tensor | None = None  # the bfloat16 merged set, reused step after step
        self.class_means: ClassMeans | None = None  # rule="herding": every class's running mean, built at chunk 1
        self._feature_scale = feature_scale
        self._resumed_means = None
        if cfg.rule == "herding":
            refuse_distributed(self.world)
        if resume is None:
            # every rank draws the same seeds from rng (selection stays identical) and offsets them by its rank
            torch.manual_seed(int(rng.integers(2**62)) + self.rank)
            self.generator.manual_seed(int(rng.integers(2**62)) + self.rank)
            self.seen_counts = np.zeros(n_classes, dtype=np.int64)
            self.step = 0
        else:
            self.optimizer.load_state_dict(resume["optimizer"])
            mine = resume["per_rank"][self.rank] if "per_rank" in resume else resume
            self.generator.set_state(mine["generator"])
            torch.set_rng_state(mine["torch_rng"])
            if mine.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(mine["cuda_rng"]))  # dropout on the GPU draws from these
            rng.bit_generator.state = resume["rng"]
            self.seen_counts = np.asarray(resume["seen_counts"]).copy()
            self.step = int(resume["step"])
            if resume.get("buffer") is not None:
                self.buffer = Buffer.from_arrays(resume["buffer"], self.device)
            if self.regularizer is not None and resume.get("regularizer") is not None:
                self.regularizer.load_state_dict(resume["regularizer"])
            self._resumed_means = resume.get("class_means")

    # -- one step ---------------------------------------------------------------------------------
    def steps(self, chunks: Iterable[ChunkData]) -> Iterator[StepEvent]:
        """One event per chunk: merge with the buffer, train, select the next buffer, evaluate.

        With CUDA graphs in one process, the next chunk is taken from ``chunks`` and copied to the GPU while
        the GPU trains on the current one, so neither the wait for it nor its upload idles the GPU.
        """
        it = iter(chunks)
        look_ahead = self.look_ahead and self.use_graphs and self.world == 1
        self._ahead = None
        try:
            while True:
                if self._ahead is not None:
                    chunk, wait, uploaded = self._ahead
                    self._ahead = None
                    if isinstance(chunk, Exception):  # reading it failed during the step before, which is complete
                        raise chunk
                else:
                    t0 = time.perf_counter()
                    chunk = next(it, None)
                    wait, uploaded = time.perf_counter() - t0, None
                if chunk is None:
                    return
                yield self.process(chunk, wait, uploaded=uploaded, upcoming=it if look_ahead else None)
        finally:  # stopped early: a chunk fetched ahead frees its host and GPU memory
            self._ahead = None

    def _fetch_ahead(self, upcoming: Iterator[ChunkData]) -> None:
        """Take the next chunk now and start its copy to the GPU on a side stream (called while the GPU trains)."""
        t0 = time.perf_counter()
        try:
            chunk = next(upcoming, None)
        except Exception as error:  # noqa: BLE001 - re-raised where the stream asks for this chunk
            self._ahead = (error, time.perf_counter() - t0, None)
            return
        wait = time.perf_counter() - t0
        uploaded = None
        try:
            host = None if chunk is None else torch.from_numpy(chunk.X)
            if host is not None and host.is_pinned():  # else the copy would block: leave it to the step
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(self._copy_stream):
                    X = host.to(self.device, non_blocking=True)
                uploaded = (X, self._copy_stream.record_event())
        except Exception:  # noqa: BLE001 - e.g. out of GPU memory: the step uploads it itself (and reports it)
            uploaded = None
        self._ahead = (chunk, wait, uploaded)
        self._ahead_wait += wait

    def process(
        self, chunk: ChunkData, wait: float = 0.0, *, uploaded=None, upcoming: Iterator[ChunkData] | None = None
    ) -> StepEvent:
        """One step on ``chunk`` (this rank's share of it under DDP).

        ``uploaded``: the chunk's features already copied to the GPU (by :meth:`_fetch_ahead`). ``upcoming``:
        the rest of the stream, whose next chunk is fetched while the GPU trains.
        """
        cfg = self.cfg
        t1 = time.perf_counter()
        self._ahead_wait = 0.0
        if uploaded is not None:
            chunk_X, copied = uploaded
            torch.cuda.current_stream(self.device).wait_event(copied)
            chunk_X.record_stream(torch.cuda.current_stream(self.device))  # allocated on the copy stream
        else:
            chunk_X = to_device(torch.from_numpy(chunk.X), self.device)
        if self.buffer is None:
            self.buffer = Buffer.empty(chunk.X.shape[1], self.n_logits, chunk.provenance, self.device,
                                       n_tasks=self.objective.n_tasks)  # fmt: skip
        buffer = self.buffer
        m = len(buffer)
        bX, by, bt, blogits = self._buffer_share(buffer)
        nb = len(by)
        X = self._merged(bX, chunk_X)
        stored = torch.cat([blogits, torch.zeros((len(chunk.y), self.n_logits), device=self.device)])
        is_buffer = torch.arange(nb + len(chunk.y)) < nb
        targets = np.concatenate([bt, chunk.targets])
        if self.regularizer is not None:  # the buffer is the episodic memory: cells of earlier steps
            self.regularizer.begin_step(self.model, bX, to_device(torch.from_numpy(bt), self.device), self.generator)
        fetch = None if upcoming is None else (lambda: self._fetch_ahead(upcoming))
        dyn, losses = self._train(X, targets, np.concatenate([by, chunk.y]), cfg.epochs_per_step, stored, is_buffer,
                                  while_training=fetch)  # fmt: skip
        local_stats = dyn.to_numpy()  # the one synchronisation of the step's training
        if self.regularizer is not None:
            t_dev = to_device(torch.from_numpy(targets), self.device)
            self.regularizer.end_step(self.model, X, t_dev, self.objective.mean_loss, self.generator)
        del X, stored
        t2 = time.perf_counter()
        stats, new, losses, starts = self._gather_step(local_stats, nb, m, chunk, losses)
        n_new = len(new.y)
        herd = None
        if cfg.rule == "herding":
            herd = self._herder(buffer, chunk_X, chunk.y, chunk.index)
        self.seen_counts += np.bincount(new.y, minlength=self.n_classes)
        y = np.concatenate([buffer.y, new.y])
        all_targets = np.concatenate([buffer.targets, new.targets])
        prov = {k: np.concatenate([buffer.provenance[k], v]) for k, v in new.provenance.items()}
        prov["age"] = np.concatenate([buffer.provenance["age"] + 1, np.zeros(n_new, np.int64)])
        prov["step_added"] = np.concatenate([buffer.provenance["step_added"], np.full(n_new, self.step)])
        prov["chunk"] = np.concatenate([buffer.provenance["chunk"], np.full(n_new, chunk.index)])
        # a cell drawn again (order="weighted" draws with replacement) competes once: its first occurrence
        cand = first_occurrences(prov["file"], prov["row"]) if cfg.order == "weighted" else None
        sub = (lambda a: a) if cand is None else (lambda a: a[cand])
        keep = select(
            sub(y), sub(score_of(stats, cfg.score)), cfg.buffer_size, n_classes=self.n_classes,
            seen_counts=self.seen_counts, rule=cfg.rule, class_budget=cfg.class_budget,
            min_per_class=cfg.min_per_class, chunk_ids=sub(prov["chunk"]), max_chunk_fraction=cfg.max_chunk_fraction,
            forgetting=sub(stats["forgetting"]), ages=sub(prov["age"]), score_decay=cfg.score_decay,
            drop_hard=cfg.drop_hard, rng=self.rng,
            herd=herd if herd is None or cand is None else (lambda cells, *a: herd([cand[i] for i in cells], *a)),
        )  # fmt: skip
        if cand is not None:
            keep = cand[keep]
        # new kept cells: their owner rank computes the logits of the model that has just learned them
        kept_new = keep[keep >= m] - m
        lo = starts[self.rank]
        mine = kept_new[(kept_new >= lo) & (kept_new < lo + len(chunk.y))] - lo
        rows = to_device(torch.from_numpy(mine), self.device)
        new_X = chunk_X[rows]
        new_logits = (
            predict_logits(self.model, new_X) if len(mine) else torch.zeros((0, self.n_logits), device=self.device)
        )
        old = to_device(torch.from_numpy(keep[keep < m]), self.device)
        self.buffer = Buffer(
            X=torch.cat([buffer.X[old], gather_rows(new_X)]),
            y=y[keep],
            logits=torch.cat([buffer.logits[old], gather_rows(new_logits)]),
            provenance={k: v[keep] for k, v in prov.items()},
            scores={k: v[keep] for k, v in stats.items()},
            targets=all_targets[keep],
        )
        t3 = time.perf_counter()
        event = self.make_event(self.step, new, losses)
        # the next chunk's wait, fetched while the GPU trained, is counted in its own step, not in training
        event.update(n_local=len(chunk.y), wait_seconds=wait, train_seconds=t2 - t1 - self._ahead_wait,
                     select_seconds=t3 - t2,
                     eval_seconds=time.perf_counter() - t3)  # fmt: skip
        self.step += 1
        return event

    def _herder(self, buffer: Buffer, chunk_X: torch.Tensor, chunk_y: np.ndarray, chunk_index: int):
        """Count the chunk into the class means; return the ``herd(cells, classes, ks, caps)`` of :func:`select`.

        Cells are positions in buffer ∪ chunk (one process: the whole chunk is this rank's).
        """
        if self.class_means is None:
            self.class_means = ClassMeans(self.n_classes, chunk_X.shape[1], self._feature_scale, self.device)
            if self._resumed_means is not None:
                self.class_means.load_state_dict(self._resumed_means)
            elif self.step > 0:
                raise InputError(
                    "resume: the checkpoint has no class means for rule='herding' (made by an older version?)."
                )
        means = self.class_means
        means.add(chunk_X, chunk_y)
        m = len(buffer)
        chunks = np.concatenate([buffer.provenance["chunk"], np.full(len(chunk_y), chunk_index)])

        def herd(cells: list[np.ndarray], classes: np.ndarray, ks: list[int], caps: list[int | None]) -> list:
            idx = np.concatenate(cells)
            P = torch.empty((len(idx), chunk_X.shape[1]), dtype=torch.float32, device=self.device)
            old, new = np.flatnonzero(idx < m), np.flatnonzero(idx >= m)
            dev = lambda a: to_device(torch.from_numpy(a), self.device)  # noqa: E731
            P[dev(old)] = buffer.X[dev(idx[old])].float()
            P[dev(new)] = chunk_X[dev(idx[new] - m)].float()
            starts = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
            rows = [np.arange(lo, hi) for lo, hi in zip(starts[:-1], starts[1:], strict=True)]  # each class's rows of P
            picks = herd_classes(
                means.scaled(P, inplace=True), rows, means.means(classes), ks, groups=chunks[idx], caps=caps
            )
            return [p - lo for p, lo in zip(picks, starts, strict=False)]

        return herd

    def _merged(self, bX: torch.Tensor, chunk_X: torch.Tensor) -> torch.Tensor:
        """The features of buffer ∪ chunk, the set the step trains on.

        Trained in bfloat16 on a CPU (and without a regularizer, which needs the float32 set), they are
        written straight into a bfloat16 workspace reused step after step: one pass instead of a fresh
        float32 merge and its cast. Fresh pages are dear (on the 2-core development VM the 96 MB merge and
        the 48 MB cast of a default step took about 150 ms, a sixth of the step).
        """
        if self.precision != "bf16-mixed" or self.regularizer is not None:
            return torch.cat([bX, chunk_X])
        n, nb = len(bX) + len(chunk_X), len(bX)
        ws = self._merge_workspace
        if ws is None or ws.shape[0] < n or ws.shape[1] != chunk_X.shape[1]:
            rows = max(n, self.cfg.buffer_size + self.cfg.chunk_size)
            ws = self._merge_workspace = torch.empty((rows, chunk_X.shape[1]), dtype=torch.bfloat16)
        X = ws[:n]
        X[:nb].copy_(bX)
        X[nb:].copy_(chunk_X)
        return X

    def _buffer_share(self, buffer: Buffer) -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor]:
        """The buffer cells this rank trains on (features, budget classes, targets, stored logits).

        All of them in one process, every world-th under DDP.
        """
        if self.world == 1:
            return buffer.X, buffer.y, buffer.targets, buffer.logits
        idx = np.arange(self.rank, len(buffer), self.world)
        idx_dev = to_device(torch.from_numpy(idx), self.device)
        return buffer.X[idx_dev], buffer.y[idx], buffer.targets[idx], buffer.logits[idx_dev]

    def _gather_step(self, local_stats, nb: int, m: int, chunk: ChunkData, losses: list[float]):
        """Every rank's statistics in the global order (buffer, then the chunk's shares in rank order)."""
        if self.world == 1:
            return local_stats, chunk, losses, [0]
        parts = gather_objects(
            {
                "stats": local_stats, "nb": nb, "y": chunk.y, "prov": chunk.provenance,
                "skipped": chunk.n_skipped, "losses": losses, "targets": chunk.targets,
            }
        )  # fmt: skip
        stats = {}
        for k in local_stats:
            buf = np.empty(m, dtype=local_stats[k].dtype)
            for r, p in enumerate(parts):
                buf[r :: self.world] = p["stats"][k][: p["nb"]]
            stats[k] = np.concatenate([buf] + [p["stats"][k][p["nb"] :] for p in parts])
        y_new = np.concatenate([p["y"] for p in parts])
        new = ChunkData(chunk.index, None, y_new, concat_by_rank([p["prov"] for p in parts]),
                        n_skipped=sum(p["skipped"] for p in parts),
                        targets=np.concatenate([p["targets"] for p in parts]))  # fmt: skip
        sizes = np.array([len(p["stats"]["aum"]) for p in parts], dtype=np.float64)
        mean_losses = (np.array([p["losses"] for p in parts]) * sizes[:, None]).sum(0) / max(sizes.sum(), 1.0)
        starts = np.concatenate([[0], np.cumsum([len(p["y"]) for p in parts])])
        return stats, new, mean_losses.tolist(), starts

    # -- the end ------------------------------------------------------------------------------------
    def finish(self) -> StepEvent | None:
        """Consolidation: ``final_epochs`` epochs on the final buffer alone; None when no chunk was seen."""
        buffer = self.buffer
        if buffer is None:
            return None
        self._merge_workspace = None  # no more steps: free it
        t0 = time.perf_counter()
        losses: list[float] = []
        if self.cfg.final_epochs > 0 and len(buffer):
            bX, by, bt, blogits = self._buffer_share(buffer)
            ones = torch.ones(len(by), dtype=torch.bool)
            _, losses = self._train(bX, bt, by, self.cfg.final_epochs, blogits, ones)
            parts = gather_objects((len(by), losses))
            total = sum(n for n, _ in parts)
            losses = (np.sum([np.asarray(ls) * n for n, ls in parts], axis=0) / max(total, 1)).tolist()
        event = self.make_event("final", None, losses)
        event.update(wait_seconds=0.0, train_seconds=time.perf_counter() - t0, select_seconds=0.0, eval_seconds=0.0)
        return event

    def _train(self, X, targets: np.ndarray, budget: np.ndarray, epochs: int, stored, is_buffer, while_training=None):
        """Epochs on the merged set: through a CUDA graph on a GPU, else eagerly (same loss, same orders)."""
        tf32 = self.device.type == "cuda" and self.cfg.tf32
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = before or tf32
        try:
            return self._train_epochs(X, targets, budget, epochs, stored, is_buffer, while_training)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    def _train_epochs(self, X, targets, budget, epochs, stored, is_buffer, while_training=None):
        cfg = self.cfg
        objective = self.objective
        # class weights from the host labels (under DDP from the whole merged set, the same on every rank):
        # the trainer then never copies labels back from the device
        counts = objective.task_counts(targets)
        n_max = len(targets)
        if self.world > 1:  # every rank's cell count (the graphs pad to the largest) and class counts
            parts = gather_objects((len(targets), counts))
            n_max = max(n for n, _ in parts)
            if cfg.balance_loss:
                counts = [np.sum(c, axis=0) for c in zip(*(c for _, c in parts), strict=True)]
        weights = objective.weights(counts)
        if self.use_graphs and self._graphed is None:
            self._graphed = GraphedTrainer(
                self.model, self.optimizer, capacity=cfg.buffer_size + cfg.chunk_size, n_features=X.shape[1],
                objective=objective, batch_size=cfg.batch_size, distill=cfg.distill, compile=cfg.compile,
            )  # fmt: skip
        if self._graphed is not None:
            return self._graphed.train(
                X, targets, epochs=epochs, generator=self.generator, stored_logits=stored, is_buffer=is_buffer,
                weights=weights, n_max=n_max, while_training=while_training,
            )  # fmt: skip
        return train_epochs(
            self.net, self.optimizer, X, to_device(torch.from_numpy(targets), self.device),
            epochs=epochs, batch_size=cfg.batch_size, objective=objective,
            generator=self.generator, distill=cfg.distill, stored_logits=stored, is_buffer=is_buffer,
            weights=weights, regularizer=self.regularizer, patience=cfg.step_patience,
            min_delta=cfg.step_min_delta, val_fraction=cfg.step_val_fraction, strata=budget,
            precision=self.precision,
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        """Everything but the model's weights needed to continue the loop at chunk ``step``.

        Under DDP every rank must call it (it gathers each rank's random generators).
        """
        mine = {
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        state = {
            "step": self.step,
            "buffer": None if self.buffer is None else self.buffer.to_arrays(),
            "seen_counts": self.seen_counts.copy(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "regularizer": None if self.regularizer is None else self.regularizer.state_dict(),
            "class_means": None if self.class_means is None else self.class_means.state_dict(),
            **mine,
        }
        if self.world > 1:
            state["per_rank"] = gather_objects(mine)
        return state

    def make_event(self, step: int | str, chunk: ChunkData | None, losses: list[float]) -> StepEvent:
        """The event of a step, the consolidation or a refit pass: buffer composition, losses, evaluation."""
        buffer = self.buffer
        n = self.n_classes
        event = StepEvent(
            step=step,
            chunk=-1 if chunk is None else chunk.index,
            n_chunk=0 if chunk is None else len(chunk.y),
            n_skipped=0 if chunk is None else chunk.n_skipped,
            n_buffer=len(buffer),
            train_loss=float(losses[-1]) if losses else float("nan"),
            epoch_losses=np.asarray(losses, dtype=np.float64),
            buffer_class_counts=np.bincount(buffer.y, minlength=n),
            buffer_chunk_counts=np.bincount(buffer.provenance["chunk"]) if len(buffer) else np.zeros(0, np.int64),
            buffer_file_counts=np.bincount(buffer.provenance["file"]) if len(buffer) else np.zeros(0, np.int64),
            chunk_class_counts=np.zeros(n, np.int64) if chunk is None else np.bincount(chunk.y, minlength=n),
        )
        if self.eval_set is not None:
            event.update(self.evaluate())
        return event

    def evaluate(self) -> dict[str, Any]:
        """Metrics on the evaluation set: of the first task, and of every task under ``task_metrics``."""
        X, targets = self.eval_set
        pred = self.objective.predictions(predict_logits(self.model, X)).cpu().numpy()
        per_task = [
            classification_metrics(targets[:, t], pred[:, t], size) for t, size in enumerate(self.objective.task_sizes)
        ]
        out = dict(per_task[0])
        if len(per_task) > 1:
            out["task_metrics"] = per_task
        return out


def first_occurrences(files: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """Sorted positions of the first occurrence of every (file, row) pair; None when all pairs are distinct."""
    keys = files.astype(np.int64) * (1 << 40) + rows.astype(np.int64)
    _, first = np.unique(keys, return_index=True)
    return None if first.size == keys.size else np.sort(first)
