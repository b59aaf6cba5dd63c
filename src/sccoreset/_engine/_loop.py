"""The streaming-coreset loop as a generator of events. Knows numpy and torch, nothing of AnnData."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._dynamics import Dynamics
from ._metrics import classification_metrics
from ._selection import select


@dataclass
class ChunkData:
    """What the engine needs of a chunk: features, integer labels, and provenance arrays."""

    index: int
    X: np.ndarray
    y: np.ndarray
    provenance: dict[str, np.ndarray]


@dataclass
class EngineConfig:
    """Parameters of the loop (see :func:`sccoreset.tl.stream_train` for their meaning)."""

    n_classes: int
    buffer_size: int = 2000
    epochs_per_step: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    score: str = "aum"
    rule: str = "coverage"
    class_budget: str = "balanced"
    min_per_class: int = 0
    max_chunk_fraction: float | None = 0.3
    score_decay: float | None = None
    drop_hard: float = 0.1
    balance_loss: bool = True
    distill: float = 0.5
    final_epochs: int = 5
    device: str = "cpu"
    seed: int = 0


@dataclass
class Buffer:
    """The kept cells: features, labels, stored logits (for distillation), provenance, scores and ages."""

    X: np.ndarray
    y: np.ndarray
    logits: np.ndarray
    provenance: dict[str, np.ndarray]
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_features: int, n_classes: int, provenance_like: dict[str, np.ndarray]) -> Buffer:
        prov = {k: v[:0].copy() for k, v in provenance_like.items()}
        prov["age"] = np.zeros(0, np.int64)
        prov["step_added"] = np.zeros(0, np.int64)
        prov["chunk"] = np.zeros(0, np.int64)
        return cls(
            np.zeros((0, n_features), np.float32), np.zeros(0, np.int64), np.zeros((0, n_classes), np.float32), prov
        )

    def __len__(self) -> int:
        return self.y.size


def class_weights(y: np.ndarray, n_classes: int, cap: float = 20.0) -> np.ndarray:
    """Per-class loss weights, inverse to class frequency in ``y``, mean 1 over cells, capped."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = y.size / (present.sum() * counts[present])
    return np.minimum(w, cap)


def _predict_logits(model: nn.Module, X: np.ndarray, device: str, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, X.shape[0], batch_size):
            out.append(model(torch.from_numpy(X[lo : lo + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    cfg: EngineConfig,
    generator: torch.Generator,
    stored_logits: np.ndarray | None = None,
    is_buffer: np.ndarray | None = None,
) -> tuple[Dynamics, list[float]]:
    """Shuffled minibatch epochs on (X, y); returns the cells' dynamics and the mean loss of each epoch.

    Loss: cross-entropy, weighted by inverse class frequency when ``cfg.balance_loss``; plus, for
    buffer cells, ``cfg.distill`` times the squared error to their stored logits (dark experience
    replay), which keeps the function learned on earlier chunks.
    """
    dev = cfg.device
    n = y.size
    dyn = Dynamics(n)
    Xt = torch.from_numpy(X).to(dev)
    yt = torch.from_numpy(y).to(dev)
    w = (
        torch.from_numpy(class_weights(y, cfg.n_classes) if cfg.balance_loss else np.ones(cfg.n_classes))
        .float()
        .to(dev)
    )
    use_distill = cfg.distill > 0 and stored_logits is not None and is_buffer is not None and is_buffer.any()
    if use_distill:
        Lt = torch.from_numpy(stored_logits).to(dev)
        Bt = torch.from_numpy(is_buffer).to(dev)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for lo in range(0, n, cfg.batch_size):
            idx = perm[lo : lo + cfg.batch_size]
            idx_d = idx.to(dev)
            xb, yb = Xt[idx_d], yt[idx_d]
            logits = model(xb)
            ce = nn.functional.cross_entropy(logits, yb, reduction="none")
            wb = w[yb]
            loss = (ce * wb).sum() / wb.sum()
            if use_distill:
                mask = Bt[idx_d]
                if mask.any():
                    loss = loss + cfg.distill * nn.functional.mse_loss(logits[mask], Lt[idx_d][mask])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dyn.update(idx.numpy(), logits, yb)
            total += float(loss.detach()) * idx.numel()
        losses.append(total / max(n, 1))
    return dyn, losses


def run(
    chunks: Iterable[ChunkData],
    model: nn.Module,
    cfg: EngineConfig,
    *,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    rng: np.random.Generator,
    resume: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The streaming-coreset loop. Yields one event (a plain dict) per step, then a ``"final"`` one.

    The last event carries the final buffer under ``"buffer"``. After every step, ``on_step`` gets the
    loop state (see :func:`loop_state`) and the step's event; passing such a state as ``resume`` (with the model's weights
    restored and ``chunks`` starting at ``state["step"]``) continues exactly where it was taken.
    """
    model.to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator()
    if resume is None:
        torch.manual_seed(int(rng.integers(2**62)))
        generator.manual_seed(int(rng.integers(2**62)))
        seen_counts = np.zeros(cfg.n_classes, dtype=np.int64)
        buffer: Buffer | None = None
        step = 0
    else:
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])  # dropout on the GPU draws from these
        rng.bit_generator.state = resume["rng"]
        seen_counts = resume["seen_counts"].copy()
        buffer = resume["buffer"]
        step = int(resume["step"])
    it = iter(chunks)
    while True:
        t0 = time.perf_counter()
        chunk = next(it, None)
        wait = time.perf_counter() - t0
        if chunk is None:
            break
        if buffer is None:
            buffer = Buffer.empty(chunk.X.shape[1], cfg.n_classes, chunk.provenance)
        t1 = time.perf_counter()
        n_buf = len(buffer)
        X = np.concatenate([buffer.X, chunk.X])
        y = np.concatenate([buffer.y, chunk.y])
        stored = np.concatenate([buffer.logits, np.zeros((len(chunk.y), cfg.n_classes), np.float32)])
        is_buffer = np.arange(y.size) < n_buf
        dyn, losses = train_epochs(
            model, optimizer, X, y, epochs=cfg.epochs_per_step, cfg=cfg, generator=generator,
            stored_logits=stored, is_buffer=is_buffer,
        )  # fmt: skip
        t2 = time.perf_counter()
        seen_counts += np.bincount(chunk.y, minlength=cfg.n_classes)
        prov = {k: np.concatenate([buffer.provenance[k], v]) for k, v in chunk.provenance.items()}
        prov["age"] = np.concatenate([buffer.provenance["age"] + 1, np.zeros(len(chunk.y), np.int64)])
        prov["step_added"] = np.concatenate([buffer.provenance["step_added"], np.full(len(chunk.y), step)])
        prov["chunk"] = np.concatenate([buffer.provenance["chunk"], np.full(len(chunk.y), chunk.index)])
        scores = dyn.score(cfg.score)
        keep = select(
            y, scores, cfg.buffer_size, n_classes=cfg.n_classes, seen_counts=seen_counts, rule=cfg.rule,
            class_budget=cfg.class_budget, min_per_class=cfg.min_per_class, chunk_ids=prov["chunk"],
            max_chunk_fraction=cfg.max_chunk_fraction, forgetting=dyn.forgetting, ages=prov["age"],
            score_decay=cfg.score_decay, drop_hard=cfg.drop_hard, rng=rng,
        )  # fmt: skip
        # new cells store the logits of the model that has just learned them; kept cells keep theirs
        new = keep[keep >= n_buf]
        if new.size:
            stored[new] = _predict_logits(model, X[new], cfg.device)
        buffer = Buffer(
            X=X[keep],
            y=y[keep],
            logits=stored[keep],
            provenance={k: v[keep] for k, v in prov.items()},
            scores={
                "aum": dyn.aum[keep],
                "confidence": dyn.confidence[keep],
                "variability": dyn.variability[keep],
                "forgetting": dyn.forgetting[keep],
                "loss": dyn.loss[keep],
            },
        )
        del X, y, stored
        t3 = time.perf_counter()
        event = _event(step, chunk, buffer, cfg, losses, eval_set, model)
        event.update(wait_seconds=wait, train_seconds=t2 - t1, select_seconds=t3 - t2,
                     eval_seconds=time.perf_counter() - t3)  # fmt: skip
        step += 1
        if on_step is not None:
            on_step(loop_state(step, buffer, seen_counts, optimizer, generator, rng), event)
        yield event
    if buffer is None:
        return
    t0 = time.perf_counter()
    losses: list[float] = []
    if cfg.final_epochs > 0 and len(buffer):
        # consolidation: a few epochs on the balanced final buffer alone
        _, losses = train_epochs(
            model, optimizer, buffer.X, buffer.y, epochs=cfg.final_epochs, cfg=cfg, generator=generator,
            stored_logits=buffer.logits, is_buffer=np.ones(len(buffer), bool),
        )  # fmt: skip
    event = _event("final", None, buffer, cfg, losses, eval_set, model)
    event.update(wait_seconds=0.0, train_seconds=time.perf_counter() - t0, select_seconds=0.0, eval_seconds=0.0)
    event["buffer"] = buffer
    yield event


def loop_state(step, buffer, seen_counts, optimizer, generator, rng) -> dict[str, Any]:
    """Everything but the model's weights needed to continue the loop at chunk ``step``."""
    return {
        "step": step,
        "buffer": buffer,
        "seen_counts": seen_counts.copy(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng": rng.bit_generator.state,
    }


def _event(step, chunk, buffer, cfg, losses, eval_set, model) -> dict[str, Any]:
    event: dict[str, Any] = {
        "step": step,
        "chunk": -1 if chunk is None else chunk.index,
        "n_chunk": 0 if chunk is None else len(chunk.y),
        "n_buffer": len(buffer),
        "train_loss": float(losses[-1]) if losses else float("nan"),
        "epoch_losses": np.asarray(losses, dtype=np.float64),
        "buffer_class_counts": np.bincount(buffer.y, minlength=cfg.n_classes),
        "buffer_chunk_counts": np.bincount(buffer.provenance["chunk"]) if len(buffer) else np.zeros(0, np.int64),
        "buffer_file_counts": np.bincount(buffer.provenance["file"]) if len(buffer) else np.zeros(0, np.int64),
        "chunk_class_counts": np.zeros(cfg.n_classes, np.int64)
        if chunk is None
        else np.bincount(chunk.y, minlength=cfg.n_classes),
    }
    if eval_set is not None:
        pred = _predict_logits(model, eval_set[0], cfg.device).argmax(1)
        event.update(classification_metrics(eval_set[1], pred, cfg.n_classes))
    return event
