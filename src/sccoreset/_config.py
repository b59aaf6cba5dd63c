# ruff: noqa: RUF009 (option fields are made by _opt, a dataclasses.field with documentation)
"""The one typed configuration of a streaming-coreset run: names, types, defaults and checks in one place.

`tl.stream_train`, the engine, the parameters stored in ``uns``, the resume check and the command line
all read their options from :class:`StreamConfig`; a choice parameter's allowed values come from its
``Literal`` type alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch

from ._errors import InputError

Score = Literal["aum", "confidence", "forgetting", "loss"]
Rule = Literal["coverage", "top", "weighted", "forgetting", "random", "herding"]
ClassBudget = Literal["balanced", "proportional", "merged"]
Order = Literal["sequential", "block_shuffle", "weighted"]
MissingLabels = Literal["skip", "error"]
Regularizer = Literal["none", "ewc", "agem", "agem_layerwise"]
Genes = Literal["list", "all"]

RandomState = int | np.random.Generator | None


def choices(literal: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` type."""
    return tuple(get_args(literal))


def check_choice(name: str, value: Any, literal: Any) -> None:
    allowed = choices(literal)
    if value not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {value!r}.")


def _opt(default: Any, doc: str, *, compared: bool = True, **kw: Any) -> Any:
    """A configuration field: its default, its one-line documentation and whether resume compares it."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata={"doc": doc, "compared": compared, **kw})
    return field(default=default, metadata={"doc": doc, "compared": compared, **kw})


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Options of :func:`sccoreset.tl.stream_train`, validated once, with the single set of defaults.

    Every field is also a keyword argument of ``stream_train`` and a ``--dashed-flag`` of
    ``python -m sccoreset train``. Fields marked ``compared`` must match when a run is resumed.
    """

    # -- the stream --------------------------------------------------------------------------
    chunk_size: int = _opt(10_000, "Cells read per step (k).")
    buffer_size: int = _opt(2_000, "Cells kept between steps (m), and the size of the returned coreset.")
    order: Order = _opt(
        "sequential",
        "Chunk composition: ``'sequential'`` (files and rows in order) or ``'block_shuffle'`` (blocks of "
        "``block_size`` rows from all files shuffled into chunks).",
    )
    block_size: int | None = _opt(
        None, "Rows per block for ``order='block_shuffle'`` or ``'weighted'`` (default min(chunk_size // 8, 1024))."
    )
    weight_key: tuple[str, ...] | None = _opt(
        None,
        "obs keys whose combinations ``order='weighted'`` balances (default: the label keys).",
    )
    weight_baseline: float = _opt(
        1000.0,
        "Count added to every combination's size by ``order='weighted'`` (scDataset's baseline; 0: inverse frequency).",
    )
    n_draws: int | None = _opt(
        None, "Cells ``order='weighted'`` draws in all, with replacement (default: as many as the files hold)."
    )
    n_top_genes: int = _opt(2000, "Highly variable genes to select when the gene space is fitted by the call.")
    gene_space_cells: int | None = _opt(
        None,
        "Cells the call fits the gene space on, drawn in blocks from all files (``pp.fit_gene_space``'s "
        "``max_cells``, seeded by ``random_state``); None: every cell. On 10^8 cells the full pass takes as long "
        "as training.",
    )
    layer: str | None = _opt(None, "Read raw counts from ``layers[layer]`` instead of ``X``.")
    mod: str | None = _opt(None, "Modality to read from MuData inputs.")
    missing_labels: MissingLabels = _opt(
        "skip",
        "Cells whose label is missing (NaN): ``'skip'`` leaves them out with a warning counting them per "
        "file, ``'error'`` refuses the stream. A missing label never becomes a class.",
    )
    # -- the model and its training ----------------------------------------------------------
    epochs_per_step: int = _opt(5, "Epochs over the buffer and the chunk at every step.")
    batch_size: int = _opt(256, "Minibatch size.")
    hidden: tuple[int, ...] = _opt((256, 128), "Hidden layer sizes of the default MLP (``()``: a linear model).")
    lr: float = _opt(1e-3, "AdamW learning rate.")
    balance_loss: bool = _opt(True, "Weight the loss by inverse class frequency within each merged set.")
    distill: float = _opt(0.5, "Weight of the logit-replay loss on buffer cells (0 turns it off).")
    final_epochs: int = _opt(5, "Epochs on the final buffer alone after the stream ends (0: none).")
    refit_heads: int = _opt(
        0,
        "Passes over the files after the stream that retrain only the model's last linear layer (the task heads) "
        "on every cell, the trunk frozen, with the class-balanced loss, in block-shuffled order; each pass reads "
        "the files once more (0: the stream is read once). One process only.",
    )
    loss: Any = _opt(
        None,
        "A callable ``loss(logits, targets, weights) -> scalar`` replacing the weighted cross-entropy, applied "
        "per task (``weights``: per-cell class weights, ones unless ``balance_loss``); None: cross-entropy. "
        "Not a command-line flag.",
        cli=False,
    )
    step_patience: int | None = _opt(
        None,
        "Early stopping within a step: ``epochs_per_step`` becomes a maximum, and training stops once the loss "
        "on a held-out, class-stratified slice of the merged set has not improved for this many epochs, "
        "restoring the best weights (None: off).",
    )
    step_min_delta: float = _opt(0.0, "Smallest held-out loss improvement that counts, for ``step_patience``.")
    step_val_fraction: float = _opt(
        0.1,
        "Fraction of every class of the merged set held out for ``step_patience`` (rounded: rare classes give none).",
    )
    regularizer: Regularizer = _opt(
        "none",
        "Continual-learning guard combined with the buffer: ``'ewc'`` (online EWC, diagonal Fisher), ``'agem'`` "
        "(A-GEM on the whole gradient, the buffer as episodic memory), ``'agem_layerwise'`` (A-GEM per parameter "
        "tensor) or ``'none'``.",
    )
    ewc_lambda: float = _opt(100.0, "Strength of the EWC penalty.")
    ewc_decay: float = _opt(0.9, "Online EWC: weight of the earlier Fisher information at each step (gamma).")
    reference_size: int = _opt(256, "Cells per reference sample: EWC's Fisher estimate, A-GEM's reference gradient.")
    # -- selection ---------------------------------------------------------------------------
    score: Score = _opt(
        "aum",
        "Training dynamic that ranks cells: ``'aum'`` (mean margin), ``'confidence'``, ``'forgetting'`` or ``'loss'``.",
    )
    rule: Rule = _opt(
        "coverage",
        "Selection rule within a class: ``'coverage'`` (evenly over the score range after dropping the "
        "hardest ``drop_hard``), ``'top'``, ``'weighted'``, ``'forgetting'``, ``'random'``, ``'herding'`` (the "
        "cells whose mean tracks the class's mean over the stream, for faithful weighted statistics; one process).",
    )
    class_budget: ClassBudget = _opt(
        "balanced",
        "``'balanced'`` (equal per class seen so far), ``'proportional'`` (to class counts seen so far) or "
        "``'merged'`` (to class counts in the current merge: plain stratified sampling, a baseline).",
    )
    min_per_class: int = _opt(0, "Floor of every seen class's budget.")
    max_chunk_fraction: float | None = _opt(
        0.3,
        "At most this fraction of a class's budget from one chunk (backfilled when it cannot be met); None: no cap.",
    )
    score_decay: float | None = _opt(
        None, "Lower buffer cells' scores by this many score standard deviations per step of age."
    )
    drop_hard: float = _opt(0.1, "Fraction of the hardest cells the coverage rule leaves out.")
    budget_key: tuple[str, ...] | None = _opt(
        None,
        "obs keys whose classes (or combinations of classes) share the buffer's budget (default: the first label key).",
    )
    genes: Genes = _opt(
        "list",
        "Genes of the returned coreset: ``'list'`` (the gene list: features in X, raw counts in layers) or "
        "``'all'`` (raw counts of every gene of the files in X, sparse; features in obsm).",
    )
    random_state: RandomState = _opt(
        0, "Seed of everything: chunk order, shuffling, selection and model initialisation (int or numpy Generator)."
    )
    # -- running (may change between an interrupted run and its resume) -----------------------
    device: str | None = _opt(None, "``'cuda'``, ``'mps'`` or ``'cpu'``; default the first available.", compared=False)
    cuda_graphs: bool = _opt(
        True,
        "On a GPU, replay each epoch of minibatch steps from a captured CUDA graph (launch overhead, not "
        "arithmetic, bounds a small model's step); False trains eagerly. Models with buffers (BatchNorm's "
        "running statistics), ``loss=``, ``regularizer=`` and ``step_patience=`` always train eagerly.",
        compared=False,
    )
    tf32: bool = _opt(
        True,
        "On a GPU, let float32 matrix products use TensorFloat-32 while training (about 30% faster steps; "
        "10-bit mantissa products, float32 sums). The global setting is restored afterwards.",
        compared=False,
    )
    cpu_bf16: bool = _opt(
        True,
        "On a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX), run the training step's forward pass "
        "under bfloat16 autocast (matrix products 3-4 times faster; float32 weights, gradients, optimizer and "
        "sums); no effect on other CPUs or on a GPU. Results then differ slightly between such CPUs and others; "
        "the precision used is recorded in ``uns['sccoreset']['params']['precision']``.",
        compared=False,
    )
    compile: bool = _opt(
        False,
        "On a GPU, fuse the step's elementwise work with torch.compile (about a minute of compilation at the start).",
        compared=False,
    )
    n_workers: int | None = _opt(
        None,
        "Threads that read and transform chunks in parallel, in order (default: the CPUs this process may use, "
        "at most 8). Each holds one chunk.",
        compared=False,
    )
    prefetch: int | None = _opt(
        None,
        "Chunks read ahead in the background while the model trains (0: read between steps, with every core). "
        "Default: 1 when training on a GPU; 0 on a CPU, where reading threads beside training compete with it "
        "for the cores (on 2 cores, reading ahead made the run 15-30% slower).",
        compared=False,
    )
    checkpoint_dir: str | None = _opt(
        None,
        "Write the whole loop state to this folder every ``checkpoint_every`` steps, atomically.",
        compared=False,
    )
    checkpoint_every: int = _opt(1, "Steps between checkpoints (the last step is always written).", compared=False)
    resume: bool = _opt(
        False,
        "Continue from the checkpoint in ``checkpoint_dir`` if there is one (else start afresh); other "
        "compared options or files are refused, naming what differs.",
        compared=False,
    )
    key_added: str = _opt(
        "sccoreset", "Key of the record in ``uns`` and prefix of the obs columns of the coreset.", compared=False
    )
    progress: bool = _opt(True, "Show a progress bar over the steps.", compared=False)
    _seed_key: int | str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            if not isinstance(self.checkpoint_dir, os.PathLike):
                raise InputError(f"checkpoint_dir must be a path, got {self.checkpoint_dir!r}.")
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        if not isinstance(self.hidden, tuple | list):
            raise InputError(f"hidden must be a tuple of positive ints (() for a linear model), got {self.hidden!r}.")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for name in ("weight_key", "budget_key"):
            object.__setattr__(self, name, _as_keys(name, getattr(self, name)))
        if self.device is not None and not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))  # a torch.device
        self._validate()
        # a Generator's state changes as the run draws from it: take its key once, at the start
        object.__setattr__(self, "_seed_key", self._make_seed_key())

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("chunk_size", "buffer_size", "epochs_per_step", "batch_size", "n_top_genes", "checkpoint_every"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("min_per_class", "final_epochs", "refit_heads"):
            _check_int(name, getattr(self, name), low=0)
        if self.prefetch is not None:
            _check_int("prefetch", self.prefetch, low=0)
        if self.block_size is not None:
            _check_int("block_size", self.block_size, low=1)
        if self.n_workers is not None:
            _check_int("n_workers", self.n_workers, low=1)
        for name in ("n_draws", "step_patience", "gene_space_cells"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        _check_int("reference_size", self.reference_size, low=1)
        _check_number("weight_baseline", self.weight_baseline, low=0.0)
        _check_number("step_min_delta", self.step_min_delta, low=0.0)
        _check_number("step_val_fraction", self.step_val_fraction, low=0.0, low_open=True, high=0.5, high_closed=True)
        _check_number("ewc_lambda", self.ewc_lambda, low=0.0)
        _check_number("ewc_decay", self.ewc_decay, low=0.0, high=1.0, high_closed=True)
        if self.loss is not None and not callable(self.loss):
            raise InputError(
                f"loss must be a callable (logits, targets, weights) -> scalar, or None; got {self.loss!r}."
            )
        if not all(isinstance(h, int | np.integer) and not isinstance(h, bool) and h > 0 for h in self.hidden):
            raise InputError(f"hidden must be a tuple of positive ints, got {self.hidden!r}.")
        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("distill", self.distill, low=0.0)
        if self.score_decay is not None:
            _check_number("score_decay", self.score_decay, low=0.0)
        _check_number("drop_hard", self.drop_hard, low=0.0, high=1.0)
        if self.max_chunk_fraction is not None:
            _check_number(
                "max_chunk_fraction", self.max_chunk_fraction, low=0.0, low_open=True, high=1.0, high_closed=True
            )
        check_choice("score", self.score, Score)
        check_choice("rule", self.rule, Rule)
        check_choice("class_budget", self.class_budget, ClassBudget)
        check_choice("order", self.order, Order)
        check_choice("missing_labels", self.missing_labels, MissingLabels)
        check_choice("regularizer", self.regularizer, Regularizer)
        check_choice("genes", self.genes, Genes)
        for name in ("balance_loss", "resume", "progress", "cuda_graphs", "compile", "tf32", "cpu_bf16"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        rs = self.random_state
        if not isinstance(rs, int | np.integer | np.random.Generator | type(None)) or isinstance(rs, bool):
            raise InputError(f"random_state must be an int, a numpy Generator or None, got {rs!r}.")
        if isinstance(rs, int | np.integer) and rs < 0:
            raise InputError(f"random_state must be a non-negative int, got {rs!r}.")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError) as e:
                raise InputError(f"device must be 'cuda', 'cuda:N', 'mps' or 'cpu', got {self.device!r}.") from e
            if kind not in ("cpu", "cuda", "mps"):
                raise InputError(f"device must be 'cuda', 'cuda:N', 'mps' or 'cpu', got {self.device!r}.")
        if self.buffer_size >= self.chunk_size:
            raise InputError(f"buffer_size ({self.buffer_size}) must be smaller than chunk_size ({self.chunk_size}).")
        if self.resume and self.checkpoint_dir is None:
            raise InputError("resume=True needs checkpoint_dir.")
        if not isinstance(self.key_added, str) or not self.key_added:
            raise InputError(f"key_added must be a non-empty string, got {self.key_added!r}.")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_options(cls, config: StreamConfig | None = None, /, **options: Any) -> StreamConfig:
        """``config`` (or the defaults) with ``options`` replaced; an unknown option name is an error."""
        names = option_names()
        unknown = [k for k in options if k not in names]
        if unknown:
            hints = [difflib.get_close_matches(k, names, n=1) for k in unknown]
            said = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints, strict=True)
            )
            raise InputError(f"unknown option {said}; the options are those of sccoreset.tl.StreamConfig.")
        if config is None:
            return cls(**options)
        if not isinstance(config, StreamConfig):
            raise InputError(f"config must be a StreamConfig, got {type(config).__name__}.")
        return dataclasses.replace(config, **options)

    # -- what is stored and compared ------------------------------------------------------------
    def random_state_key(self) -> int | str | None:
        """The seed as a comparable value: the int, or a digest of a Generator's state when the run started."""
        return self._seed_key

    def _make_seed_key(self) -> int | str | None:
        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            state = json.dumps(rs.bit_generator.state, sort_keys=True, default=str)
            return f"Generator({type(rs.bit_generator).__name__}, {hashlib.sha1(state.encode()).hexdigest()[:16]})"
        return None if rs is None else int(rs)

    def _plain(self, name: str) -> Any:
        """An option's value as stored and compared: seeds by key, callables by name."""
        if name == "random_state":
            return self.random_state_key()
        value = getattr(self, name)
        return callable_name(value) if callable(value) else value

    def comparable(self) -> dict[str, str]:
        """The options a resume must match, as strings."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            if f.metadata.get("compared", True):
                value = self._plain(f.name)
                out[f.name] = repr(value)
        return out

    def to_uns(self) -> dict[str, Any]:
        """Every option as a value .h5ad can store (None as the string ``"None"``, tuples as JSON)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            v = self._plain(f.name)
            if v is None:
                out[f.name] = "None"
            elif isinstance(v, bool | int | float | str | np.integer | np.floating):
                out[f.name] = v
            else:
                out[f.name] = json.dumps(list(v)) if isinstance(v, tuple | list) else str(v)
        return out


def _as_keys(name: str, value: Any) -> tuple[str, ...] | None:
    """An obs key or a sequence of keys as a tuple of names (None stays None)."""
    if value is None:
        return None
    keys = (value,) if isinstance(value, str) else value
    if not isinstance(keys, tuple | list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise InputError(f"{name} must be an obs key or a sequence of obs keys, got {value!r}.")
    return tuple(keys)


def callable_name(fn: Any) -> str:
    """A stable name of a callable option (its module and qualified name; never an address)."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def option_fields() -> list[dataclasses.Field]:
    """The public option fields of :class:`StreamConfig`, in order."""
    return [f for f in dataclasses.fields(StreamConfig) if not f.name.startswith("_")]


def option_names() -> list[str]:
    return [f.name for f in option_fields()]


def options_doc(indent: str = "    ") -> str:
    """The options as numpydoc parameter entries (used in docstrings; ``--help`` uses the same text)."""
    lines = []
    for f in option_fields():
        lines += [f"{indent}{f.name}", f"{indent}    {f.metadata['doc']} Default ``{f.default!r}``."]
    return "\n".join(lines)


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise InputError(f"{name} must be {'positive' if low == 1 else f'at least {low}'}, got {value!r}.")


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_closed: bool = False,
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not np.isfinite(value)
    ):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value > high if high_closed else value >= high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = "]" if high_closed else ")"
        if high is None:
            rng = "positive" if low_open and low == 0 else f">= {low}"
            raise InputError(f"{name} must be {rng}, got {value!r}.")
        raise InputError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}.")
