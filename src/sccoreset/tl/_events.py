"""`tl.stream_events`: the streaming-coreset loop as an iterator of plain-dict step events."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from anndata import AnnData

from .._config import StreamConfig
from .._io._sources import open_sources
from ..pp._gene_space import GeneSpace
from ._session import StreamRun


class EventStream:
    """The events of one run, in order; :meth:`coreset` builds the coreset from the buffer at any point.

    Iterating yields one dict per step (the keys of :class:`~sccoreset._engine._events.StepEvent`, plus
    ``"model"``, a reference to the model being trained, and ``"label_keys"``, ``"task_sizes"`` and ``"classes"``
    (of the first task), which say how to read its outputs), then the final consolidation's (``step="final"``),
    then one per pass of ``refit_heads`` (``step="refit"``).
    With ``epochs=True`` every step event is preceded by one event per epoch of that step
    (``kind="epoch"``, ``step``, ``epoch``, ``train_loss``), emitted once the step's training is over.
    The files stay open until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, files: Any, label_key: str, cfg: StreamConfig, *, epochs: bool = False, **run_kw: Any) -> None:
        self.config = cfg
        self.epochs = epochs
        self._stack = contextlib.ExitStack()
        try:
            sources = self._stack.enter_context(open_sources(files, mod=cfg.mod, layer=cfg.layer))
            self.run = StreamRun(sources, label_key, cfg, **run_kw)
        except BaseException:
            self._stack.close()
            raise
        # what an augmenter needs to read the model's outputs: the tasks, their classes, their logit blocks
        self._run_info = {
            "label_keys": list(self.run.label_keys),
            "task_sizes": [len(t) for t in self.run.tasks],
            "classes": list(self.run.classes),
        }
        self._events = self._generate()
        self.finished = False

    def _generate(self) -> Iterator[dict[str, Any]]:
        for event in self.run.events_iter():
            if self.epochs:  # emitted once the step's training is over: no host sync inside a step
                for e, loss in enumerate(event["epoch_losses"]):
                    yield {
                        "kind": "epoch", "step": event["step"], "epoch": e, "train_loss": float(loss),
                        "model": self.run.model,
                    }  # fmt: skip
            yield {**event, "model": self.run.model, **self._run_info}
        self.finished = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._events)

    @property
    def n_steps(self) -> int:
        """Chunks in the stream (steps of the run)."""
        return self.run.n_steps

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    def coreset(self) -> AnnData:
        """The coreset of the buffer as it stands, with the history so far.

        After a stream stopped early (a ``break``, :func:`~sccoreset.stream.take`,
        :func:`~sccoreset.stream.early_stop`) the final consolidation epochs have not run; the model is the
        one of the last step. ``uns[key]["params"]["steps_done"]`` says how many steps were taken.
        """
        adata = self.run.coreset()
        rec = adata.uns[self.config.key_added]
        rec["params"]["steps_done"] = int(self.run.loop.step)
        rec["params"]["finished"] = bool(self.finished)
        rec["params"]["cells_not_read"] = int(sum(self.run.chunk_sizes[self.run.loop.step :]))
        return adata

    def close(self) -> None:
        """Stop the run (its reading threads) and close the files."""
        self._events.close()
        self._stack.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_events(
    files: Sequence[Any] | Any,
    label_key: str,
    *,
    gene_space: GeneSpace | None = None,
    classes: Sequence[str] | None = None,
    model: torch.nn.Module | None = None,
    eval_data: Any = None,
    config: StreamConfig | None = None,
    epochs: bool = False,
    **options: Any,
) -> EventStream:
    """The run of :func:`~sccoreset.tl.stream_train` as an iterator of step events you can enrich, filter and sink.

    Takes the same arguments as :func:`~sccoreset.tl.stream_train`. Compose it with the stages of
    :mod:`sccoreset.stream`; whenever you stop, :meth:`EventStream.coreset` gives the coreset. With
    ``epochs=True`` each step event is preceded by that step's epoch events (``kind="epoch"``).

    Returns
    -------
    An :class:`EventStream` (an iterator and a context manager).

    Examples
    --------
    >>> import sccoreset as scc
    >>> stream = scc.datasets.pbmc_stream(tmp_dir, n_files=3)  # doctest: +SKIP
    >>> with scc.tl.stream_events(stream.files, stream.label_key, chunk_size=200, buffer_size=60) as events:
    ...     seen = scc.stream.collect(scc.stream.pipe(events, scc.stream.take(2)))
    ...     coreset = events.coreset()  # doctest: +SKIP
    """
    cfg = StreamConfig.from_options(config, **options)
    return EventStream(
        files, label_key, cfg, epochs=epochs, gene_space=gene_space, classes=classes, model=model, eval_data=eval_data
    )
