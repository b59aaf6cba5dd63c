"""Per-cell training dynamics gathered from the forward passes of training, kept where the model runs.

All statistics are tensors on the training device, updated with index operations inside the
minibatch loop: nothing is copied to the host until the step's training is over.
"""

from __future__ import annotations

import numpy as np
import torch

from .._config import Score

_N_SEEN, _SUM_P, _SUM_P2, _SUM_MARGIN, _SUM_LOSS, _FORGETTING, _LAST_CORRECT = range(7)


class Dynamics:
    """Running per-cell statistics over the epochs of one step, packed in one ``(n, 7)`` tensor.

    ``confidence``: mean probability of the true class; ``variability``: its standard deviation
    across epochs (dataset cartography); ``aum``: mean margin, true logit minus the largest other
    logit (area under the margin); ``forgetting``: correct-to-incorrect transitions between epochs;
    ``loss``: mean cross-entropy. One gather and one scatter per minibatch update all of them (counts
    are exact in float32 up to 2**24 epochs).

    With several tasks (``offsets`` of each task's block of logits), probability and margin are
    averaged over the tasks, the loss summed, and a cell is correct when every task is.
    """

    def __init__(
        self,
        n: int,
        device: str | torch.device = "cpu",
        n_classes: int | None = None,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.offsets = [0, n_classes] if offsets is None else [int(o) for o in offsets]
        self.stats = torch.zeros((n, 7), dtype=torch.float32, device=device)
        # the logits of the current epoch, written by index per minibatch (one kernel) and turned into
        # statistics once per epoch: each cell is seen once an epoch, so this equals per-batch updates
        self.epoch_logits = None if n_classes is None else torch.zeros((n, n_classes), device=device)

    def reset(self) -> None:
        self.stats.zero_()

    def head(self, n: int) -> Dynamics:
        """The statistics of the first ``n`` cells (a view)."""
        out = Dynamics.__new__(Dynamics)
        out.stats = self.stats[:n]
        out.offsets = self.offsets
        out.epoch_logits = None if self.epoch_logits is None else self.epoch_logits[:n]
        return out

    @torch.no_grad()
    def record(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep a minibatch's logits until the end of the epoch (``idx`` unique within the epoch)."""
        self.epoch_logits[idx] = logits.detach().float()

    @torch.no_grad()
    def end_epoch(self, y: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Fold the epoch's logits into the statistics: of all ``len(y)`` cells, or of cells ``idx`` only."""
        if idx is None:
            n = y.shape[0]
            self.update(torch.arange(n, device=y.device), self.epoch_logits[:n], None, y)
        else:
            self.update(idx, self.epoch_logits[idx], None, y[idx])

    @torch.no_grad()
    def update(self, idx: torch.Tensor, logits: torch.Tensor, log_p_true: torch.Tensor | None, y: torch.Tensor) -> None:
        """Record cells ``idx`` (unique) with their logits and labels ``y`` (``(n,)``, or ``(n, n_tasks)``).

        ``log_p_true`` (log p(true class), one task only) is derived if None.
        """
        logits = logits.detach().float()
        y2 = y[:, None] if y.ndim == 1 else y
        n_tasks = y2.shape[1]
        if n_tasks == 1:
            y = y2[:, 0]
            if log_p_true is None:
                log_p_true = torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
            log_p_true = log_p_true.detach()
            true_logit = logits.gather(1, y[:, None])[:, 0]
            other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            correct = (logits.argmax(1) == y).float()
            p, margin, nll = log_p_true.exp(), true_logit - other, -log_p_true
        else:
            p = margin = nll = 0.0
            correct = 1.0
            for t in range(n_tasks):
                lt = logits[:, self.offsets[t] : self.offsets[t + 1]]
                yt = y2[:, t : t + 1]
                lp = torch.log_softmax(lt, 1).gather(1, yt)[:, 0]
                p = p + lp.exp() / n_tasks
                margin = margin + (lt.gather(1, yt)[:, 0] - lt.scatter(1, yt, float("-inf")).amax(1)) / n_tasks
                nll = nll - lp
                correct = correct * (lt.argmax(1) == yt[:, 0]).float()
        old = self.stats[idx]
        forgot = (old[:, _N_SEEN] > 0).float() * old[:, _LAST_CORRECT] * (1.0 - correct)
        delta = torch.stack([torch.ones_like(p), p, p * p, margin, nll, forgot, correct - old[:, _LAST_CORRECT]], 1)
        self.stats[idx] = old + delta

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The per-cell statistics on the host (one copy, after training)."""
        s = self.stats.double().cpu().numpy()
        n = np.maximum(s[:, _N_SEEN], 1.0)
        conf = s[:, _SUM_P] / n
        return {
            "aum": s[:, _SUM_MARGIN] / n,
            "confidence": conf,
            "variability": np.sqrt(np.maximum(s[:, _SUM_P2] / n - conf**2, 0.0)),
            "forgetting": np.rint(s[:, _FORGETTING]).astype(np.int32),
            "loss": s[:, _SUM_LOSS] / n,
        }


def score_of(stats: dict[str, np.ndarray], name: Score) -> np.ndarray:
    """Score to rank by, higher = easier: aum, confidence, forgetting (negated), loss (negated)."""
    if name in ("aum", "confidence"):
        return stats[name]
    if name in ("forgetting", "loss"):
        return -stats[name].astype(np.float64)
    raise ValueError(name)
