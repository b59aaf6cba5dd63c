"""Per-cell training dynamics gathered from the forward passes of training (no extra passes)."""

from __future__ import annotations

import numpy as np
import torch

SCORES = ("aum", "confidence", "forgetting", "loss")


class Dynamics:
    """Running per-cell statistics over the epochs of one step.

    ``confidence``: mean probability of the true class; ``variability``: its standard deviation
    across epochs (dataset cartography); ``aum``: mean margin, true logit minus the largest other
    logit (area under the margin); ``forgetting``: correct-to-incorrect transitions between epochs;
    ``loss``: mean cross-entropy.
    """

    def __init__(self, n: int) -> None:
        self.n_seen = np.zeros(n, dtype=np.int32)
        self.sum_p = np.zeros(n)
        self.sum_p2 = np.zeros(n)
        self.sum_margin = np.zeros(n)
        self.sum_loss = np.zeros(n)
        self.forgetting = np.zeros(n, dtype=np.int32)
        self.last_correct = np.zeros(n, dtype=bool)

    @torch.no_grad()
    def update(self, idx: np.ndarray, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.detach().float()
        logp = torch.log_softmax(logits, dim=1)
        true_logit = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        p = logp.gather(1, y[:, None])[:, 0].exp()
        correct = (logits.argmax(1) == y).cpu().numpy()
        p, margin, loss = (
            p.cpu().numpy(),
            (true_logit - other).cpu().numpy(),
            (-logp.gather(1, y[:, None])[:, 0]).cpu().numpy(),
        )
        seen_before = self.n_seen[idx] > 0
        self.forgetting[idx] += (seen_before & self.last_correct[idx] & ~correct).astype(np.int32)
        self.last_correct[idx] = correct
        self.n_seen[idx] += 1
        self.sum_p[idx] += p
        self.sum_p2[idx] += p * p
        self.sum_margin[idx] += margin
        self.sum_loss[idx] += loss

    def _mean(self, s: np.ndarray) -> np.ndarray:
        return s / np.maximum(self.n_seen, 1)

    @property
    def confidence(self) -> np.ndarray:
        return self._mean(self.sum_p)

    @property
    def variability(self) -> np.ndarray:
        return np.sqrt(np.maximum(self._mean(self.sum_p2) - self.confidence**2, 0.0))

    @property
    def aum(self) -> np.ndarray:
        return self._mean(self.sum_margin)

    @property
    def loss(self) -> np.ndarray:
        return self._mean(self.sum_loss)

    def score(self, name: str) -> np.ndarray:
        """Score to rank by, higher = easier: aum, confidence, forgetting (negated), loss (negated)."""
        if name == "aum":
            return self.aum
        if name == "confidence":
            return self.confidence
        if name == "forgetting":
            return -self.forgetting.astype(np.float64)
        if name == "loss":
            return -self.loss
        raise ValueError(name)
