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
    """

    def __init__(self, n: int, device: str | torch.device = "cpu") -> None:
        self.stats = torch.zeros((n, 7), dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.stats.zero_()

    def head(self, n: int) -> Dynamics:
        """The statistics of the first ``n`` cells (a view)."""
        out = Dynamics.__new__(Dynamics)
        out.stats = self.stats[:n]
        return out

    @torch.no_grad()
    def update(self, idx: torch.Tensor, logits: torch.Tensor, log_p_true: torch.Tensor, y: torch.Tensor) -> None:
        """Record one minibatch: ``idx`` (unique within the batch) its cells, ``log_p_true`` log p(true class)."""
        logits = logits.detach().float()
        log_p_true = log_p_true.detach()
        old = self.stats[idx]
        true_logit = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        correct = (logits.argmax(1) == y).float()
        p = log_p_true.exp()
        forgot = (old[:, _N_SEEN] > 0).float() * old[:, _LAST_CORRECT] * (1.0 - correct)
        delta = torch.stack(
            [torch.ones_like(p), p, p * p, true_logit - other, -log_p_true, forgot, correct - old[:, _LAST_CORRECT]], 1
        )
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
