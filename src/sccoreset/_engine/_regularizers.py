"""Continual-learning regularizers that guard the buffer's knowledge while a step trains on new cells.

Two families, both optional companions of the replay buffer:

* **Online EWC** (:class:`OnlineEWC`): a quadratic penalty that keeps every parameter near its value
  at the end of the previous step, weighted by its diagonal Fisher information (Kirkpatrick et al.,
  2017), with the online update of Schwarz et al. (2018): one running Fisher, decayed at every step,
  and one anchor, the latest parameters.
* **A-GEM** (:class:`AGEM`): the gradient of every minibatch is projected so that, to first order,
  it does not increase the loss on a reference minibatch drawn from the episodic memory (the
  buffer) (Chaudhry et al., 2019); :class:`LayerwiseAGEM` applies the same rule to every parameter
  tensor on its own.

The engine drives a regularizer through five calls: :meth:`Regularizer.begin_step` before a step's
epochs, :meth:`Regularizer.penalty` added to every minibatch loss, :meth:`Regularizer.adjust_gradients`
between ``loss.backward()`` and ``optimizer.step()``, :meth:`Regularizer.end_step` after the epochs,
and ``state_dict``/``load_state_dict`` for checkpoints. Fisher information and reference gradients
are computed in eval mode (no dropout): they describe the model that is kept and used for prediction,
and they are deterministic for given cells; the model's training mode is restored afterwards.

References
----------
Kirkpatrick, J. et al. (2017). Overcoming catastrophic forgetting in neural networks. *PNAS* 114(13), 3521-3526.

Schwarz, J. et al. (2018). Progress & compress: a scalable framework for continual learning. *ICML*.

Chaudhry, A., Ranzato, M., Rohrbach, M. and Elhoseiny, M. (2019). Efficient lifelong learning with A-GEM. *ICLR*.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

try:  # absent from torch builds without distributed support
    from torch.distributed.algorithms.join import Joinable, JoinHook
except ImportError:  # pragma: no cover
    Joinable = object  # type: ignore[assignment,misc]
    JoinHook = object  # type: ignore[assignment,misc]

try:
    from torch.func import functional_call, grad, vmap
except ImportError:  # pragma: no cover - torch < 2.0
    functional_call = grad = vmap = None

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Most floats the per-sample gradients of one vmap call may hold (128 MiB in float32).
_PER_SAMPLE_BUDGET = 2**25
#: Reference minibatches of A-GEM drawn (and uploaded) at once.
_DRAW_BLOCK = 64


def make_regularizer(cfg: Any) -> Regularizer | None:
    """The regularizer that ``cfg.regularizer`` names, or None for ``"none"``.

    Parameters
    ----------
    cfg
        A :class:`~sccoreset._config.StreamConfig` (or anything with its ``regularizer``,
        ``ewc_lambda``, ``ewc_decay`` and ``reference_size`` attributes).

    Returns
    -------
    :class:`OnlineEWC`, :class:`AGEM` or :class:`LayerwiseAGEM`, or None.
    """
    kind = cfg.regularizer
    if kind == "none":
        return None
    if kind == "ewc":
        return OnlineEWC(lam=cfg.ewc_lambda, decay=cfg.ewc_decay, reference_size=cfg.reference_size)
    if kind == "agem":
        return AGEM(reference_size=cfg.reference_size)
    if kind == "agem_layerwise":
        return LayerwiseAGEM(reference_size=cfg.reference_size)
    raise ValueError(f"unknown regularizer {kind!r}.")


class Regularizer:
    """Base class: every hook is a no-op.

    Subclasses override the hooks they need. ``model`` is always the plain module (not its
    DistributedDataParallel wrapper); ``loss_fn(logits, targets)`` returns the mean loss over the
    given cells, ``targets`` being int64 of shape ``(n, T)``.
    """

    kind = "none"

    def begin_step(
        self, model: nn.Module, X_ref: torch.Tensor, targets_ref: torch.Tensor, generator: torch.Generator
    ) -> None:
        """Before a step's epochs, with this process's buffer cells (the episodic memory), possibly none."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term to add to the minibatch loss, or None when there is nothing to add."""
        return None

    def adjust_gradients(self, model: nn.Module, loss_fn: LossFn) -> None:
        """Change ``p.grad`` in place between ``loss.backward()`` and ``optimizer.step()``."""

    def end_step(
        self, model: nn.Module, X: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, generator: torch.Generator
    ) -> None:
        """After a step's epochs, with the step's merged set on the model's device."""

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {"kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"a {state['kind']!r} regularizer state cannot be loaded into {self.kind!r}.")


# -- helpers ------------------------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device(device: torch.device) -> torch.device:
    """Where tensors for a collective must live: the model's device under NCCL, else the host."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks, returned on ``t``'s device."""
    buf = t.to(_collective_device(t.device))
    dist.all_reduce(buf)
    return buf.to(t.device)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train, by name (without the prefix that ``torch.compile`` adds)."""
    return [(name.replace("_orig_mod.", ""), p) for name, p in model.named_parameters() if p.requires_grad]


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, in its former mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """``k`` distinct indices of ``range(n)`` drawn on the host, or None when ``n <= k`` (take them all)."""
    if n <= k:
        return None
    return torch.randperm(n, generator=generator)[:k]


# -- online EWC ---------------------------------------------------------------------------------


class OnlineEWC(Regularizer):
    r"""Online elastic weight consolidation with the diagonal empirical Fisher.

    After every step, the Fisher information of the parameters is estimated on ``reference_size``
    cells of the step's merged set as the mean of squared per-sample gradients of the loss (the
    *empirical* Fisher: true labels, not labels sampled from the model), in eval mode. The running
    Fisher and the anchor are then updated online (Schwarz et al., 2018)

    .. math:: F \leftarrow \gamma F + F_\text{new}, \qquad \theta^* \leftarrow \theta,

    and every minibatch loss of the following steps gets the penalty (Kirkpatrick et al., 2017)

    .. math:: \frac{\lambda}{2} \sum_i F_i \, (\theta_i - \theta^*_i)^2 .

    Parameters
    ----------
    lam
        :math:`\lambda`, the strength of the penalty (``ewc_lambda``).
    decay
        :math:`\gamma`, the weight of the earlier Fisher at each step (``ewc_decay``).
    reference_size
        Cells of the merged set the Fisher is estimated on (all of them when there are fewer).

    Notes
    -----
    Per-sample gradients come from :mod:`torch.func` (``vmap`` of ``grad`` of ``functional_call``) in
    groups that hold at most 2**25 floats of gradients; if ``torch.func`` is unavailable or fails on
    the model or ``loss_fn`` (a loss that reads values on the host, say), a loop of one backward per
    cell gives the same numbers, more slowly. Under ``torch.distributed`` the sums of squared gradients
    and the cell counts are all-reduced, so every rank holds the Fisher of all ranks' reference cells
    (the mean over ranks when they hold as many): every rank must call :meth:`end_step`.

    Fisher and anchor are updated in place once they exist, so a CUDA graph that captured
    :meth:`penalty` stays valid across steps. :meth:`penalty` makes no host synchronisation.
    """

    kind = "ewc"

    def __init__(self, lam: float = 100.0, decay: float = 0.9, reference_size: int = 256) -> None:
        self.lam = float(lam)
        self.decay = float(decay)
        self.reference_size = int(reference_size)
        self.names: list[str] = []
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self.steps = 0
        self._use_vmap = vmap is not None

    # the engine's hooks

    def begin_step(
        self, model: nn.Module, X_ref: torch.Tensor, targets_ref: torch.Tensor, generator: torch.Generator
    ) -> None:
        """Check the model against the state and move a loaded Fisher and anchor to its device."""
        names = [name for name, _ in _trainable(model)]
        if self.fisher is not None and names != self.names:
            raise ValueError(f"the EWC state holds parameters {self.names}, the model {names}.")
        self._to_device(_model_device(model))

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        r"""``lam / 2 * sum(F * (theta - theta*) ** 2)``, or None before the first :meth:`end_step` (or with ``lam == 0``)."""
        if self.fisher is None or self.anchor is None or self.lam == 0.0:
            return None
        params = [p for _, p in _trainable(model)]
        if not params:
            return None
        if len(params) != len(self.fisher):
            raise ValueError(f"the model has {len(params)} trainable tensors, the EWC state {len(self.fisher)}.")
        if params and params[0].device != self.fisher[0].device:
            self._to_device(params[0].device)
        total = sum((f * (p - a).square()).sum() for p, f, a in zip(params, self.fisher, self.anchor, strict=True))
        return (0.5 * self.lam) * total

    def end_step(
        self, model: nn.Module, X: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, generator: torch.Generator
    ) -> None:
        """Estimate the Fisher on ``reference_size`` cells of ``X``, fold it into the running one, re-anchor."""
        named = _trainable(model)
        idx = _subset(int(X.shape[0]), self.reference_size, generator)
        if idx is not None:
            idx = idx.to(X.device)
            X, targets = X[idx], targets[idx]
        sq, n = self.squared_gradients(model, X, targets, loss_fn)
        count = torch.tensor([float(n)], device=sq[0].device if sq else X.device)
        if _world() > 1:
            flat = _all_reduce_sum(torch.cat([s.reshape(-1) for s in sq] + [count]))
            sq = [t.view_as(s) for t, s in zip(flat[:-1].split([s.numel() for s in sq]), sq, strict=True)]
            count = flat[-1:]
        new = [s / count.clamp_min(1.0) for s in sq]
        with torch.no_grad():
            if self.fisher is None or self.anchor is None:
                self.names = [name for name, _ in named]
                self.fisher = new
                self.anchor = [p.detach().clone() for _, p in named]
            else:
                for f, fn, a, (_, p) in zip(self.fisher, new, self.anchor, named, strict=True):
                    f.mul_(self.decay).add_(fn)
                    a.copy_(p)
        self.steps += 1

    # the Fisher

    def squared_gradients(
        self, model: nn.Module, X: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn
    ) -> tuple[list[torch.Tensor], int]:
        """Sums over the cells of ``X`` of their squared per-sample gradients (one tensor per trainable parameter), and the count.

        The model is evaluated in eval mode; each cell's loss is ``loss_fn(model(x[None]), t[None])``.
        """
        named = _trainable(model)
        sq = [torch.zeros_like(p, dtype=torch.float32) for _, p in named]
        n = int(X.shape[0])
        if n == 0 or not named:
            return sq, n
        with _eval_mode(model):
            if self._use_vmap:
                try:
                    self._vmap_squares(model, named, X, targets, loss_fn, sq)
                    return sq, n
                except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                    self._use_vmap = False
                    warnings.warn(
                        f"per-sample gradients with torch.func failed ({type(err).__name__}: {err}); EWC computes "
                        "the Fisher with one backward pass per cell instead.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    for s in sq:
                        s.zero_()
            self._loop_squares(model, named, X, targets, loss_fn, sq)
        return sq, n

    @staticmethod
    def _vmap_squares(model, named, X, targets, loss_fn, sq) -> None:
        # functional_call needs the module's own names (with torch.compile's prefix, if any), in ``named``'s order
        params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        buffers = {name: b.detach() for name, b in model.named_buffers()}

        def one_loss(prm, x, t):
            return loss_fn(functional_call(model, (prm, buffers), (x.unsqueeze(0),)), t.unsqueeze(0))

        per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0))
        n_params = sum(p.numel() for _, p in named)
        group = max(1, _PER_SAMPLE_BUDGET // max(n_params, 1))
        for lo in range(0, int(X.shape[0]), group):
            g = per_sample(params, X[lo : lo + group], targets[lo : lo + group])
            for s, name in zip(sq, params, strict=True):
                s.add_(g[name].float().square().sum(0))

    @staticmethod
    def _loop_squares(model, named, X, targets, loss_fn, sq) -> None:
        params = [p for _, p in named]
        for i in range(int(X.shape[0])):
            loss = loss_fn(model(X[i : i + 1]), targets[i : i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for s, g in zip(sq, grads, strict=True):
                if g is not None:
                    s.add_(g.float().square())

    # state

    def _to_device(self, device: torch.device) -> None:
        if self.fisher is not None and self.fisher and self.fisher[0].device != device:
            self.fisher = [f.to(device) for f in self.fisher]
        if self.anchor is not None and self.anchor and self.anchor[0].device != device:
            self.anchor = [a.to(device) for a in self.anchor]

    def state_dict(self) -> dict[str, Any]:
        """``kind``, ``steps``, ``names`` and the ``fisher`` and ``anchor`` tensors (lists; empty before the first step)."""
        return {
            "kind": self.kind,
            "steps": self.steps,
            "names": list(self.names),
            "fisher": [f.detach().clone() for f in self.fisher] if self.fisher is not None else [],
            "anchor": [a.detach().clone() for a in self.anchor] if self.anchor is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, in place when this regularizer already holds tensors of the same shapes."""
        super().load_state_dict(state)
        self.steps = int(state["steps"])
        self.names = list(state["names"])
        fisher = [torch.as_tensor(np.asarray(f)) if not torch.is_tensor(f) else f for f in state["fisher"]]
        anchor = [torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a for a in state["anchor"]]
        if not fisher:
            self.fisher = self.anchor = None
            return
        same = self.fisher is not None and [f.shape for f in self.fisher] == [f.shape for f in fisher]
        if same and self.anchor is not None:
            with torch.no_grad():
                for dst, src in zip(self.fisher + self.anchor, fisher + anchor, strict=True):
                    dst.copy_(src)
        else:
            self.fisher = [f.detach().clone() for f in fisher]
            self.anchor = [a.detach().clone() for a in anchor]


# -- A-GEM --------------------------------------------------------------------------------------


class AGEM(Regularizer, Joinable):
    r"""Averaged gradient episodic memory: project the gradient when it would raise the memory's loss.

    With :math:`g` the minibatch gradient (already averaged over ranks by DDP) and :math:`g_\text{ref}`
    the gradient of the loss on a reference minibatch of the memory (Chaudhry et al., 2019):

    .. math:: g \leftarrow g - \frac{g^\top g_\text{ref}}{g_\text{ref}^\top g_\text{ref}} \, g_\text{ref}
              \quad \text{if } g^\top g_\text{ref} < 0,

    over the whole flattened gradient; :class:`LayerwiseAGEM` applies it to each parameter tensor.

    Parameters
    ----------
    reference_size
        Cells per reference minibatch. When the memory holds no more, every reference gradient is
        taken on the whole memory; otherwise each call draws ``reference_size`` cells uniformly with
        replacement (an unbiased estimate; drawing is O(``reference_size``) on the host, in blocks of
        64 draws uploaded at once, so CPU and GPU runs draw the same cells).

    Notes
    -----
    The reference gradient is taken in eval mode with :func:`torch.autograd.grad`, which returns it
    without touching ``p.grad``: the current gradient is never overwritten, and DDP's gradient hooks
    do not fire. Only parameters whose ``p.grad`` is set take part in the projection.

    Cost per minibatch: one forward and backward on ``reference_size`` cells plus a few elementwise
    passes over the parameters; the projection makes no host synchronisation, but the draws are host
    work and the reference minibatch is not graph-capturable (run A-GEM eagerly).

    Under ``torch.distributed`` the reference gradients are all-reduced (one collective per minibatch,
    weighted by each rank's number of reference cells, so a rank with an empty memory share counts for
    nothing), and :meth:`begin_step` all-reduces the memory sizes once so that every rank agrees on
    whether A-GEM is active. Ranks that run out of minibatches early under
    :class:`torch.distributed.algorithms.join.Join` must shadow that collective: pass the regularizer
    to the context *after* the DDP model, ``Join([ddp_model, regularizer])`` (this class is a
    :class:`~torch.distributed.algorithms.join.Joinable`).
    """

    kind = "agem"
    layerwise = False

    def __init__(self, reference_size: int = 256) -> None:
        super().__init__()  # Joinable's: a disabled join configuration until used in a Join context
        self.reference_size = int(reference_size)
        self._X: torch.Tensor | None = None
        self._t: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._block: torch.Tensor | None = None
        self._next = 0
        self._active = False
        self._n_params = 0
        self._device = torch.device("cpu")

    def begin_step(
        self, model: nn.Module, X_ref: torch.Tensor, targets_ref: torch.Tensor, generator: torch.Generator
    ) -> None:
        """Hold the memory for this step's reference minibatches; A-GEM is off while it is empty on all ranks."""
        self._X, self._t, self._generator = X_ref, targets_ref, generator
        self._block, self._next = None, 0
        self._device = _model_device(model)
        self._n_params = sum(p.numel() for _, p in _trainable(model))
        n = int(X_ref.shape[0])
        if _world() > 1:
            n = int(_all_reduce_sum(torch.tensor([n], device=self._device)).item())
        self._active = n > 0

    def end_step(
        self, model: nn.Module, X: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, generator: torch.Generator
    ) -> None:
        """Let go of the memory (the next step brings its own)."""
        self._X = self._t = self._generator = self._block = None
        self._active = False

    def adjust_gradients(self, model: nn.Module, loss_fn: LossFn) -> None:
        """Project ``p.grad`` in place against a fresh reference gradient; a no-op with an empty memory."""
        if not self._active:
            return
        named = _trainable(model)
        ref = self.reference_gradient(model, loss_fn)
        pairs = [(p.grad, r) for (_, p), r in zip(named, ref, strict=True) if p.grad is not None]
        if not pairs:
            return
        with torch.no_grad():
            if self.layerwise:
                for g, r in pairs:
                    _project([g], [r])
            else:
                _project([g for g, _ in pairs], [r for _, r in pairs])

    def reference_gradient(self, model: nn.Module, loss_fn: LossFn) -> list[torch.Tensor]:
        """Gradient of ``loss_fn`` on a reference minibatch of the memory, one tensor per trainable parameter.

        Averaged over the ranks' reference cells under ``torch.distributed``; ``p.grad`` is left as it is.
        """
        named = _trainable(model)
        params = [p for _, p in named]
        X, t = self._X, self._t
        n = int(X.shape[0]) if X is not None else 0
        if n > 0:
            idx = self._draw(n)
            if idx is not None:
                X, t = X[idx], t[idx]
            with _eval_mode(model):
                loss = loss_fn(model(X), t)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            ref = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]
            k = int(X.shape[0])
        else:
            ref, k = [torch.zeros_like(p) for p in params], 0
        if _world() > 1:
            ref = self._average(ref, k)
        return ref

    # drawing and averaging

    def _draw(self, n: int) -> torch.Tensor | None:
        """Indices of the next reference minibatch on the memory's device, or None for the whole memory."""
        if n <= self.reference_size:
            return None
        if self._block is None or self._next >= self._block.shape[0]:
            block = torch.randint(n, (_DRAW_BLOCK, self.reference_size), generator=self._generator)
            self._block, self._next = block.to(self._X.device), 0
        idx = self._block[self._next]
        self._next += 1
        return idx

    @staticmethod
    def _average(ref: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """``sum_r k_r ref_r / sum_r k_r`` over the ranks (zeros when no rank has memory)."""
        weight = torch.tensor([float(k)], device=ref[0].device if ref else "cpu")
        flat = _all_reduce_sum(torch.cat([r.reshape(-1) * k for r in ref] + [weight]))
        flat = flat[:-1] / flat[-1:].clamp_min(1.0)
        return [f.view_as(r) for f, r in zip(flat.split([r.numel() for r in ref]), ref, strict=True)]

    # Joinable: ranks that ran out of minibatches shadow the reference gradient's all-reduce

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """A hook whose ``main_hook`` shadows one :meth:`adjust_gradients` all-reduce with zero weight."""
        return _AGEMJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        """The device of the model (where NCCL collectives live)."""
        return self._device

    @property
    def join_process_group(self) -> Any:
        """The default process group."""
        return dist.group.WORLD


class LayerwiseAGEM(AGEM):
    """A-GEM with the projection rule applied to every parameter tensor on its own (see :class:`AGEM`)."""

    kind = "agem_layerwise"
    layerwise = True


class _AGEMJoinHook(JoinHook):
    def __init__(self, agem: AGEM) -> None:
        self.agem = agem

    def main_hook(self) -> None:
        a = self.agem
        if a._active and _world() > 1:
            _all_reduce_sum(torch.zeros(a._n_params + 1, device=a._device))


def _project(grads: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """A-GEM's rule on the vector made of ``grads``, in place, with no host synchronisation."""
    dot = torch.stack([(g.float() * r.float()).sum() for g, r in zip(grads, refs, strict=True)]).sum()
    norm2 = torch.stack([r.float().square().sum() for r in refs]).sum()
    coef = torch.where(dot < 0, dot / norm2.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    for g, r in zip(grads, refs, strict=True):
        g.sub_((coef * r).to(g.dtype))
