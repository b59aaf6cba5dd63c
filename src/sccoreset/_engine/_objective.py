"""The training loss over one or more tasks: one block of logits (one head) per task, losses summed.

A single-task run is the one-task case: logits ``(n, C)``, targets ``(n, 1)``. Multi-task runs (cell line,
drug, mechanism of action, ...) concatenate their heads' logits, and the targets hold one column per task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(y: np.ndarray, n_classes: int, cap: float = 20.0) -> np.ndarray:
    """Per-class loss weights, inverse to class frequency in ``y``, mean 1 over cells, capped."""
    return weights_from_counts(np.bincount(y, minlength=n_classes), cap)


def weights_from_counts(counts: np.ndarray, cap: float = 20.0) -> np.ndarray:
    """Inverse-frequency class weights from class counts (0 for absent classes), mean 1 over cells, capped."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros(counts.size)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return np.minimum(w, cap)


def as_targets(y: np.ndarray | torch.Tensor):
    """Targets as a 2-D ``(n, n_tasks)`` array or tensor (a 1-D label vector is one task)."""
    return y[:, None] if y.ndim == 1 else y


def replay_loss(logits: torch.Tensor, stored: torch.Tensor, buf_weight: torch.Tensor) -> torch.Tensor:
    """Dark experience replay: mean squared error of the buffer cells' logits to the logits stored with them.

    ``buf_weight`` is 1 for buffer cells and 0 for the chunk's; the mean runs over buffer cells and logits.
    """
    sq = (logits.float() - stored).square().sum(1)
    return (sq * buf_weight).sum() / (buf_weight.sum() * logits.shape[1]).clamp_min(1.0)


def replay_sum(logits: torch.Tensor, stored_masked: torch.Tensor, buf_weight: torch.Tensor) -> torch.Tensor:
    """The numerator of :func:`replay_loss` from ``stored * buf_weight`` (``buf_weight`` 0 or 1, shape ``(n, 1)``).

    ``((stored - logits) * buf_weight)**2`` summed: one fused multiply-add and a sum (the graphed step divides by
    its denominator, computed once an epoch).
    """
    return torch.addcmul(stored_masked, logits.float(), buf_weight, value=-1.0).square().sum()


class Objective:
    """Weighted cross-entropy per task (or the user's loss), summed over tasks.

    Parameters
    ----------
    task_sizes
        Classes of each task; the model's output concatenates one block of logits per task, in order.
    balance_loss
        Weight every task's loss by inverse class frequency in the merged set.
    loss
        ``loss(logits, targets, weights) -> scalar`` for one task's logits ``(n, C)``, integer targets
        ``(n,)`` and per-cell weights ``(n,)``; None: the weighted mean cross-entropy.
    """

    def __init__(self, task_sizes: Sequence[int], *, balance_loss: bool = True, loss: LossFn | None = None) -> None:
        self.task_sizes = [int(c) for c in task_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.task_sizes)]).astype(np.int64)
        self.n_logits = int(self.offsets[-1])
        self.balance_loss = balance_loss
        self.user_loss = loss

    @property
    def n_tasks(self) -> int:
        return len(self.task_sizes)

    def task_counts(self, targets: np.ndarray) -> list[np.ndarray]:
        """Class counts of every task in host targets ``(n, n_tasks)``."""
        return [np.bincount(targets[:, t], minlength=c) for t, c in enumerate(self.task_sizes)]

    def weights(self, counts: Sequence[np.ndarray]) -> np.ndarray:
        """Per-class weights of all tasks, concatenated like the logits (ones unless ``balance_loss``)."""
        if not self.balance_loss:
            return np.ones(self.n_logits)
        return np.concatenate([weights_from_counts(c) for c in counts])

    def __call__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        w: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of a minibatch: ``logits (n, n_logits)``, ``targets (n, n_tasks)``, ``w`` from :meth:`weights`.

        ``mask`` (``(n,)``, 0 or 1) leaves padding rows out of the loss: a minibatch of padding alone has loss 0
        (the data-parallel CUDA graph pads ranks with fewer cells to the same number of minibatches).
        """
        total = None
        for t in range(self.n_tasks):
            lo, hi = int(self.offsets[t]), int(self.offsets[t + 1])
            lt = logits[:, lo:hi].float()
            yt = targets[:, t]
            wb = torch.ones_like(lt[:, 0]) if w is None else w[yt + lo] if lo else w[yt]
            if mask is not None:
                wb = wb * mask
            if self.user_loss is not None:
                part = self.user_loss(lt, yt, wb)
            else:
                log_p_true = torch.log_softmax(lt, 1).gather(1, yt[:, None])[:, 0]
                denom = wb.sum() if mask is None else wb.sum().clamp_min(1e-12)
                part = -(log_p_true * wb).sum() / denom
            total = part if total is None else total + part
        return total

    def summed_task_losses(self, logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """Per task, the class-weighted cross-entropy summed over rows; rows whose target is -100 are left out.

        Divided by the sum of the rows' weights (``w`` of their classes), each is the task's term of
        :meth:`__call__` (built-in loss only): one ``nll_loss`` a task, for callers that compute the
        denominators in advance (the graphed step, once an epoch).
        """
        return [
            F.cross_entropy(logits[:, lo:hi].float(), targets[:, t], weight=w[lo:hi], reduction="sum")
            for t, (lo, hi) in enumerate(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True))
        ]

    def mean_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The unweighted loss (what the regularizers' reference gradients and Fisher use)."""
        return self(logits, targets, None)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class of every task: ``(n, n_tasks)`` integer tensor."""
        cols = [logits[:, int(self.offsets[t]) : int(self.offsets[t + 1])].argmax(1) for t in range(self.n_tasks)]
        return torch.stack(cols, 1)
