"""Herding: keep the cells whose mean tracks the class's mean over the whole stream.

The ``"herding"`` selection rule (iCaRL's exemplar rule, Rebuffi et al. 2017; kernel herding, Welling 2009)
picks a class's cells one at a time, each time the cell that brings the mean of the cells picked so far
closest to a target: the running mean of every cell of the class the stream has shown. A uniform sample's
mean is off by the cells' own noise over the square root of the sample size; herding picks cells whose
noise cancels, so weighted statistics of the coreset (pseudobulk means) follow the stream more closely.

Pure torch on whatever device holds the features; one host synchronisation per class.
"""

from __future__ import annotations

import numpy as np
import torch


class ClassMeans:
    """Running per-class sums of (scaled) features over every cell the stream has shown.

    Parameters
    ----------
    n_classes, n_features
        Shape of the sums.
    scale
        Per-feature factors applied before summing (the gene space's standard deviations map the model's
        standardised features back to log-normalised expression units); None: ones.
    device
        Where the sums live (beside the features).
    """

    def __init__(self, n_classes: int, n_features: int, scale: np.ndarray | None, device: torch.device) -> None:
        self.sums = torch.zeros((n_classes, n_features), dtype=torch.float64, device=device)
        self.counts = np.zeros(n_classes, dtype=np.int64)
        self.scale = None if scale is None else torch.as_tensor(np.asarray(scale, np.float32), device=device)
        if self.scale is not None and self.scale.shape != (n_features,):
            raise ValueError(f"herding scale has shape {tuple(self.scale.shape)}, expected ({n_features},).")

    def scaled(self, X: torch.Tensor) -> torch.Tensor:
        """``X`` in the space the means live in (float32)."""
        X = X.float()
        return X if self.scale is None else X * self.scale

    def add(self, X: torch.Tensor, y: np.ndarray) -> None:
        """Count the cells ``X`` of classes ``y``."""
        if len(y):
            idx = torch.from_numpy(np.asarray(y, np.int64)).to(self.sums.device)
            self.sums.index_add_(0, idx, self.scaled(X).double())
            self.counts += np.bincount(y, minlength=len(self.counts))

    def mean(self, c: int) -> torch.Tensor:
        return (self.sums[c] / max(int(self.counts[c]), 1)).float()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums.cpu().numpy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.sums.copy_(torch.from_numpy(np.asarray(state["sums"])))
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


def herding_order(
    P: torch.Tensor,
    target: torch.Tensor,
    k: int,
    *,
    groups: np.ndarray | None = None,
    cap: int | None = None,
    exchange_passes: int = 1,
) -> np.ndarray:
    """The ``min(k, len(P))`` rows of ``P`` picked greedily so that their running mean tracks ``target``.

    Pick ``j`` takes the row minimising ``||S + x - j * target||`` (``S`` the sum of the rows picked before),
    that is the one minimising ``||x||^2 - 2 x . (j * target - S)``. Then ``exchange_passes`` passes take each
    picked row out in turn and put back the best open row (possibly the same): the distance of the ``k``
    rows' mean to ``target`` never grows. With ``groups`` (a group id per row) and ``cap``, at most ``cap``
    rows of a group are picked while rows of groups under their cap remain.

    Returns positions into ``P``, in pick order; all of ``range(n)`` when ``k >= n`` (every row is kept).
    """
    n = P.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    device = P.device
    P = P.float()
    sq = (P * P).sum(1)
    to_target = P @ target.float()  # x . target
    to_sum = torch.zeros(n, device=device)  # x . S
    open_ = torch.ones(n, dtype=torch.bool, device=device)
    picked = torch.empty(k, dtype=torch.int64, device=device)
    columns = torch.empty((k, n), device=device)  # P @ x for each picked x: what its removal takes off to_sum
    capped = cap is not None and groups is not None
    if capped:
        g = torch.from_numpy(np.unique(groups, return_inverse=True)[1].astype(np.int64)).to(device)
        taken = torch.zeros(int(g.max()) + 1, dtype=torch.int64, device=device)
    inf = torch.tensor(float("inf"), device=device)

    def put(slot: int, j: int) -> None:
        cost = sq - 2.0 * (j * to_target - to_sum)
        allowed = open_
        if capped:  # rows of groups under their cap, or any open row once every group is full
            under = open_ & (taken[g] < cap)
            allowed = torch.where(under.any(), under, open_)
        i = torch.argmin(torch.where(allowed, cost, inf))
        picked[slot] = i
        open_[i] = False
        torch.mv(P, P[i], out=columns[slot])
        to_sum.add_(columns[slot])
        if capped:
            taken[g[i]] += 1

    for j in range(k):
        put(j, j + 1)
    for _ in range(exchange_passes):
        for slot in range(k):
            i = picked[slot]
            open_[i] = True
            to_sum.sub_(columns[slot])
            if capped:
                taken[g[i]] -= 1
            put(slot, k)
    return picked.cpu().numpy()
