"""Minibatch epochs on a merged set that lives on the training device, with no host synchronisation inside.

The merged features are uploaded once per step; shuffling orders are drawn on the host (so CPU and GPU
runs see the same minibatches) and uploaded once per step; losses and per-cell dynamics accumulate in
device tensors; the host reads them once, after the last epoch.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._adamw import FusedAdamW, fused_adamw_available
from ._dynamics import Dynamics
from ._objective import Objective, as_targets, replay_loss
from ._precision import autocast


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0):
    """AdamW through torch's fused kernel (:class:`~sccoreset._engine._adamw.FusedAdamW`, capturable in a CUDA graph).

    Where torch lacks the fused kernel for the device (CPU before torch 2.4), ``torch.optim.AdamW`` with its
    multi-tensor loop. On 2 CPU cores the fused step is about 2.5 times faster than torch's default per-tensor
    loop, which makes a whole minibatch step of the default MLP about a third faster.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if fused_adamw_available(device):
        return FusedAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def host_orders(n: int, epochs: int, generator: torch.Generator) -> torch.Tensor:
    """``epochs`` random permutations of ``range(n)`` from the host generator, as one (epochs, n) tensor."""
    if epochs == 0:
        return torch.zeros((0, n), dtype=torch.int64)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(epochs)])


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Copy to ``device``: asynchronously when ``t`` sits in pinned host memory (the chunk reader's output can).

    Pinning a pageable tensor here would cost more than the copy it speeds up, so pageable tensors are
    copied as they are.
    """
    if torch.device(device).type == "cuda" and t.device.type == "cpu" and t.is_pinned():
        return t.to(device, non_blocking=True)
    return t.to(device)


def train_epochs(
    model: nn.Module,
    optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    objective: Objective | None = None,
    n_classes: int | None = None,
    balance_loss: bool = True,
    distill: float = 0.0,
    stored_logits: torch.Tensor | None = None,
    is_buffer: torch.Tensor | None = None,
    weights: np.ndarray | None = None,
    regularizer=None,
    patience: int | None = None,
    min_delta: float = 0.0,
    val_fraction: float = 0.1,
    strata: np.ndarray | None = None,
    precision: str = "32",
) -> tuple[Dynamics, list[float]]:
    """Shuffled minibatch epochs on (X, y), both on the model's device; the cells' dynamics and each epoch's mean loss.

    Loss: ``objective`` (default: cross-entropy over ``n_classes``, weighted by inverse class frequency
    when ``balance_loss``), over the targets ``y`` (``(n,)`` or ``(n, n_tasks)``); plus, for buffer
    cells (``is_buffer``), ``distill`` times the squared error to their stored logits (dark experience
    replay), which keeps the function learned on earlier chunks; plus the ``regularizer``'s penalty
    (EWC), whose ``adjust_gradients`` may also project each gradient (A-GEM). ``weights`` overrides the
    class weights (under DDP they come from the labels of all ranks).

    With ``patience``, ``epochs`` is a maximum: a class-stratified ``val_fraction`` of the cells (strata:
    ``strata``, default the first task's labels) is held out of training, its loss measured after every
    epoch, and training stops once it has not improved by more than ``min_delta`` for ``patience``
    epochs; the best epoch's weights are restored. Held-out cells still get dynamics (from their
    held-out logits). This reads one number per epoch back to the host (a synchronisation).

    ``precision="bf16-mixed"`` runs the forward pass and loss under bfloat16 autocast (see
    :mod:`~sccoreset._engine._precision`); weights, gradients and optimizer state stay float32.
    """
    dev = X.device
    targets = as_targets(y)
    n = int(targets.shape[0])
    if objective is None:
        objective = Objective([n_classes], balance_loss=balance_loss)
    dyn = Dynamics(n, dev, objective.n_logits, objective.offsets)
    # the labels back on the host only when the caller did not pass what they give (a copy and a sync on a GPU)
    t_host = targets.cpu().numpy() if weights is None or (patience is not None and strata is None) else None
    if weights is None:
        weights = objective.weights(objective.task_counts(t_host))
    w = to_device(torch.from_numpy(np.asarray(weights)).float(), dev)
    use_distill = distill > 0 and stored_logits is not None and is_buffer is not None and len(is_buffer) > 0
    if use_distill:
        buf_weight = is_buffer.to(dev, torch.float32)
        use_distill = bool(buf_weight.sum() > 0) if dev.type == "cpu" else True  # on a GPU, no sync for this
    epoch_loss = torch.zeros(epochs, dtype=torch.float32, device=dev)
    model.train()
    step = _Step(model, optimizer, objective, w, distill if use_distill else 0.0, stored_logits,
                 buf_weight if use_distill else None, regularizer, precision)  # fmt: skip
    # autocast would cast every minibatch to bfloat16 for the first product: cast the merged set once instead
    # (the loop hands it over in bfloat16 already)
    X_step = X.to(torch.bfloat16) if precision == "bf16-mixed" else X
    if patience is None:
        orders = to_device(host_orders(n, epochs, generator), dev)
        with joined(model, regularizer):
            _epochs(step, X_step, targets, orders, epoch_loss, dyn, batch_size)
        done = epochs
    else:
        strata = t_host[:, 0] if strata is None else strata
        done = _epochs_early_stop(step, X, X_step, targets, epochs, epoch_loss, dyn, batch_size, generator,
                                  patience, min_delta, val_fraction, strata)  # fmt: skip
    n_trained = max(n - getattr(step, "n_val", 0), 1)
    return dyn, (epoch_loss[:done] / n_trained).tolist()


def joined(model: nn.Module, regularizer=None):
    """Under DDP, a Join context (else a null context).

    Ranks holding a few cells fewer finish earlier; Join shadows their all-reduces (DDP's, and A-GEM's
    reference gradient's) until every rank is done.
    """
    if not isinstance(model, DistributedDataParallel):
        return nullcontext()
    from torch.distributed.algorithms.join import Join, Joinable

    return Join([model] + ([regularizer] if isinstance(regularizer, Joinable) else []))


class _Step:
    """One minibatch step: loss, backward, regularizer, optimizer (shared by both epoch loops)."""

    def __init__(self, model, optimizer, objective, w, distill, stored_logits, buf_weight, regularizer, precision):
        self.model, self.optimizer, self.objective, self.w = model, optimizer, objective, w
        self.distill, self.stored_logits, self.buf_weight = distill, stored_logits, buf_weight
        self.regularizer, self.precision = regularizer, precision
        self.module = model.module if isinstance(model, DistributedDataParallel) else model

    def __call__(self, X, targets, idx):
        # index_select copies whole rows; X[idx] goes element by element (8x slower on a CPU for 2,000 columns)
        xb, yb = X.index_select(0, idx), targets[idx]
        with autocast(self.precision):
            logits = self.model(xb)
            loss = self.objective(logits, yb, self.w)
            if self.distill > 0:
                loss = loss + self.distill * replay_loss(logits, self.stored_logits[idx], self.buf_weight[idx])
        reg = self.regularizer
        if reg is not None:
            extra = reg.penalty(self.module)
            if extra is not None:
                loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if reg is not None:
            reg.adjust_gradients(self.module, self.objective.mean_loss)
        self.optimizer.step()
        return loss, logits


def _epochs(step, X, targets, orders, epoch_loss, dyn, batch_size):
    n = int(orders.shape[1])
    for e in range(orders.shape[0]):
        order = orders[e]
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            loss, logits = step(X, targets, idx)
            dyn.record(idx, logits)
            epoch_loss[e] += loss.detach() * idx.numel()
        dyn.end_epoch(targets)


def stratified_holdout(strata: np.ndarray, fraction: float, generator: torch.Generator) -> np.ndarray:
    """A boolean mask holding out ``fraction`` of every stratum, rounded (a stratum keeps at least one cell).

    A stratum smaller than ``1 / (2 * fraction)`` cells gives none: rare classes keep all their cells for
    training.
    """
    n = strata.size
    perm = torch.randperm(n, generator=generator).numpy()
    held = np.zeros(n, dtype=bool)
    ranked = perm[np.argsort(strata[perm], kind="stable")]  # shuffled within each stratum
    _, starts, counts = np.unique(strata[ranked], return_index=True, return_counts=True)
    for start, count in zip(starts, counts, strict=True):
        k = min(round(float(fraction) * int(count)), int(count) - 1)
        held[ranked[start : start + k]] = True
    return held


def _epochs_early_stop(step, X, X_step, targets, epochs, epoch_loss, dyn, batch_size, generator, patience,
                       min_delta, fraction, strata):  # fmt: skip
    dev = X.device
    held = stratified_holdout(np.asarray(strata), fraction, generator)
    train_idx = np.flatnonzero(~held)
    val_idx = to_device(torch.from_numpy(np.flatnonzero(held)), dev)
    step.n_val = int(held.sum())
    model, module, objective = step.model, step.module, step.objective
    best, best_state, bad, done = float("inf"), None, 0, 0
    for e in range(epochs):
        perm = torch.stack([torch.randperm(train_idx.size, generator=generator)])
        order = to_device(torch.from_numpy(train_idx)[perm], dev)
        model.train()
        # one Join per epoch: every rank has finished the epoch before the held-out loss is all-reduced
        with joined(model, step.regularizer):
            for lo in range(0, train_idx.size, batch_size):
                idx = order[0, lo : lo + batch_size]
                loss, logits = step(X_step, targets, idx)
                dyn.record(idx, logits)
                epoch_loss[e] += loss.detach() * idx.numel()
        val = _held_out_loss(module, objective, X, targets, val_idx, dyn)
        dyn.end_epoch(targets, torch.cat([order[0], val_idx]))
        done = e + 1
        if val == float("inf"):  # nothing held out (every class a single cell): all epochs
            continue
        if val < best - min_delta:
            best, bad = val, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    model.train()
    return done


@torch.no_grad()
def _held_out_loss(module, objective, X, targets, val_idx, dyn) -> float:
    """Mean loss of the held-out cells (their logits also feed the dynamics); averaged over ranks under DDP.

    In float32 when ``X`` is float32; a bfloat16 ``X`` (the loop's merged set on a CPU) goes through autocast.
    """
    module.eval()
    with autocast("bf16-mixed" if X.dtype == torch.bfloat16 else "32"):
        logits = module(X[val_idx]) if val_idx.numel() else torch.zeros((0, objective.n_logits), device=X.device)
        logits = logits.float()
        if val_idx.numel():
            dyn.record(val_idx, logits)
        total = objective.mean_loss(logits, targets[val_idx]) * val_idx.numel() if val_idx.numel() else None
    sums = torch.stack([total if total is not None else torch.zeros((), device=X.device),
                        torch.tensor(float(val_idx.numel()), device=X.device)])  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, count = sums.tolist()
    return loss / count if count else float("inf")


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits of the rows of ``X`` (on the model's device), in eval mode."""
    model.eval()
    if X.shape[0] == 0:
        return torch.zeros((0, 0), device=X.device)
    return torch.cat([model(X[lo : lo + batch_size]).float() for lo in range(0, X.shape[0], batch_size)])


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def host_logits(model: nn.Module, X: np.ndarray, device: str | torch.device, batch_size: int = 4096) -> np.ndarray:
    """Logits of host features ``X`` on ``device``, as a host array (used by prediction)."""
    model.to(device)
    out = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, X.shape[0], batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(X[lo : lo + batch_size])).to(device)
            out.append(model(xb).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
