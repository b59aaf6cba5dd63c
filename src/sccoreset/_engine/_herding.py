"""Herding: keep the cells whose mean tracks the class's mean over the whole stream.

The ``"herding"`` selection rule (iCaRL's exemplar rule, Rebuffi et al. 2017; kernel herding, Welling 2009)
picks a class's cells one at a time, each time the cell that brings the mean of the cells picked so far
closest to a target: the running mean of every cell of the class the stream has shown. A uniform sample's
mean is off by the cells' own noise over the square root of the sample size; herding picks cells whose
noise cancels, so weighted statistics of the coreset (pseudobulk means) follow the stream more closely.

Pure torch on whatever device holds the features; one host synchronisation per batch of classes.
"""

from __future__ import annotations

import numpy as np
import torch

from .._errors import InputError

BLOCK_BYTES = 256 << 20  # the padded (classes, rows, features) block of one batch of classes


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

    def scaled(self, X: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``X`` in the space the means live in (float32); ``inplace``: scale a float32 ``X`` the caller owns."""
        X = X.float()
        if self.scale is None:
            return X
        return X.mul_(self.scale) if inplace else X * self.scale

    def add(self, X: torch.Tensor, y: np.ndarray) -> None:
        """Count the cells ``X`` of classes ``y``."""
        if len(y):
            idx = torch.from_numpy(np.asarray(y, np.int64)).to(self.sums.device)
            self.sums.index_add_(0, idx, self.scaled(X).double())
            self.counts += np.bincount(y, minlength=len(self.counts))

    def means(self, classes: np.ndarray) -> torch.Tensor:
        """The running means of ``classes`` (float32, one row each)."""
        idx = torch.from_numpy(np.asarray(classes, np.int64)).to(self.sums.device)
        n = torch.from_numpy(np.maximum(self.counts[np.asarray(classes, np.int64)], 1)).to(self.sums.device)
        return (self.sums[idx] / n[:, None]).float()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums.cpu().numpy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.sums.copy_(torch.from_numpy(np.asarray(state["sums"])))
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


def refuse_distributed(world: int) -> None:
    """Herding compares every candidate's features in one process: an error under torch.distributed."""
    if world > 1:
        raise InputError(
            "rule='herding' compares every candidate cell's features in one process; it does not run under "
            f"torch.distributed (world size {world}). Use another rule there."
        )


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
    rows = np.arange(len(P), dtype=np.int64)
    return herd_classes(P, [rows], target[None], [k], groups=groups, caps=[cap], exchange_passes=exchange_passes)[0]


def herd_classes(
    P: torch.Tensor,
    members: list[np.ndarray],
    targets: torch.Tensor,
    ks: list[int],
    *,
    groups: np.ndarray | None = None,
    caps: list[int | None] | None = None,
    exchange_passes: int = 1,
) -> list[np.ndarray]:
    """:func:`herding_order` for several classes at once: one pick of every class per kernel launch.

    ``members[c]`` are the rows of ``P`` of class ``c`` (disjoint), ``targets[c]`` and ``ks[c]`` its target and
    number of picks, ``caps[c]`` its per-group cap (None: none). The classes' rows are laid out in a padded
    ``(classes, rows, features)`` block, so each pick is a handful of batched operations whatever the number
    of classes (on a GPU, per-class loops cost a launch per operation per class). Returns, per class, positions
    into ``P`` in pick order.
    """
    n_cls = len(ks)
    members = [np.asarray(m, dtype=np.int64) for m in members]
    out: list[np.ndarray] = [m if int(k) >= len(m) else np.zeros(0, np.int64) for m, k in zip(members, ks, strict=True)]
    todo = sorted((c for c in range(n_cls) if 0 < int(ks[c]) < len(members[c])), key=lambda c: len(members[c]))
    # on a GPU, batches of classes of similar sizes (padding at most doubles a class) whose padded block stays
    # within BLOCK_BYTES; on a CPU, where a launch is cheap and padding is not, one class at a time
    batch: list[int] = []
    for c in todo:
        n_c = len(members[c])
        full = batch and (
            P.device.type == "cpu"
            or n_c > 2 * len(members[batch[0]])
            or (len(batch) + 1) * n_c * P.shape[1] * 4 > BLOCK_BYTES
        )
        if full:
            _herd_batch(P, members, batch, targets, ks, groups, caps, exchange_passes, out)
            batch = []
        batch.append(c)
    if batch:
        _herd_batch(P, members, batch, targets, ks, groups, caps, exchange_passes, out)
    return out


def _herd_batch(P, members, todo, targets, ks, groups, caps, exchange_passes, out) -> None:
    """Herd the classes ``todo`` in one padded block; write their picks into ``out``.

    Every operation covers all classes of the block. A class with no pick left at a step picks the extra all-zero
    row ``width`` (never open) instead, which changes nothing, so no operation needs a per-class mask; the cost
    ``||x||^2 - 2 j x . target + 2 x . S`` is updated in place. On a GPU a pick is about a dozen launches.
    """
    device = P.device
    n_rows = len(todo)
    width = max(len(members[c]) for c in todo)
    pos = np.full((n_rows, width + 1), -1, dtype=np.int64)  # column `width`: the all-zero row
    for r, c in enumerate(todo):
        pos[r, : len(members[c])] = members[c]
    pos_t = torch.from_numpy(pos).to(device)
    valid = pos_t >= 0
    X = P.float()[pos_t.clamp_min(0)] * valid[..., None]  # (classes, rows, features); padding rows are zeros
    k = torch.tensor([int(ks[c]) for c in todo], device=device)
    k_max = int(max(int(ks[c]) for c in todo))
    active = torch.arange(k_max, device=device)[:, None] < k[None]  # (pick, class)
    sq = (X * X).sum(2)
    to_target = torch.einsum("crf,cf->cr", X, targets[todo].float())
    to_sum = torch.zeros_like(sq)
    cost = sq - 2.0 * to_target  # the first pick's cost
    open_ = valid.clone()
    picked = torch.zeros((n_rows, k_max), dtype=torch.int64, device=device)
    columns = torch.zeros((n_rows, k_max, width + 1), device=device)  # X @ x for each picked x
    rows = torch.arange(n_rows, device=device)
    zero_row = torch.full((n_rows,), width, dtype=torch.int64, device=device)
    capped = groups is not None and caps is not None and any(caps[c] is not None for c in todo)
    if capped:
        g_all = np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64)
        n_groups = int(g_all.max()) + 1
        g = torch.from_numpy(np.where(pos >= 0, g_all[np.maximum(pos, 0)], n_groups)).to(device)  # padding: a spare
        cap = torch.tensor([caps[c] if caps[c] is not None else width + 1 for c in todo], device=device)
        taken = torch.zeros((n_rows, n_groups + 1), dtype=torch.int64, device=device)
        one = torch.ones((n_rows, 1), dtype=torch.int64, device=device)
    inf = torch.tensor(float("inf"), device=device)

    def put(slot: int) -> None:
        allowed = open_
        if capped:  # rows of groups under their cap, or any open row once every group is full
            under = open_ & (taken.gather(1, g) < cap[:, None])
            allowed = torch.where(under.any(1, keepdim=True), under, open_)
        i = torch.where(active[slot], torch.argmin(torch.where(allowed, cost, inf), dim=1), zero_row)
        picked[:, slot] = i
        open_.scatter_(1, i[:, None], False)
        col = torch.bmm(X, X[rows, i][:, :, None])[..., 0]
        columns[:, slot] = col
        to_sum.add_(col)
        cost.add_(col, alpha=2.0)
        if capped:
            taken.scatter_add_(1, g.gather(1, i[:, None]), one)

    for j in range(k_max):
        put(j)
        cost.sub_(to_target, alpha=2.0)  # the next pick's multiple of the target
    if exchange_passes:
        cost = sq - 2.0 * k[:, None] * to_target + 2.0 * to_sum  # k picks: each class's own multiple
    for _ in range(exchange_passes):
        for slot in range(k_max):  # take the slot's row out (the zero row where the class has no such slot)
            i = picked[:, slot]
            open_.scatter_(1, i[:, None], True)
            open_[:, width] = False
            to_sum.sub_(columns[:, slot])
            cost.sub_(columns[:, slot], alpha=2.0)
            if capped:
                taken.scatter_add_(1, g.gather(1, i[:, None]), -one)
            put(slot)
    picked_host = picked.cpu().numpy()
    for r, c in enumerate(todo):
        out[c] = pos[r, picked_host[r, : int(ks[c])]]
