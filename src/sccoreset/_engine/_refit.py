"""A second pass over the stream that retrains only the heads (the model's last linear layer).

After the stream, the trunk has learned from every cell, but the heads of tasks whose classes arrive along
the stream keep a bias toward the recent ones that the buffer alone is too small to remove (Kang et al.
2020, "Decoupling representation and classifier"). Reading the files once more, the trunk frozen in
evaluation mode, the heads see every cell again with the class-balanced loss, in block-shuffled order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._errors import InputError
from ._objective import Objective
from ._train import make_optimizer


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last :class:`~torch.nn.Linear` module (its heads, for the default MLP)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("refit_heads: the model has no torch.nn.Linear layer to retrain.")
    return linears[-1]


class HeadRefit:
    """Minibatch training of the head on the frozen trunk's features, chunk after chunk.

    Parameters
    ----------
    model
        The trained model; its output must be its last linear layer's output.
    objective
        The run's loss (class weights from each chunk's counts when ``balance_loss``).
    lr, batch_size
        AdamW learning rate and minibatch size of the head's training.
    generator
        Draws the minibatch order (on the host).
    """

    def __init__(
        self, model: nn.Module, objective: Objective, *, lr: float, batch_size: int, generator: torch.Generator
    ) -> None:
        self.model, self.objective = model, objective
        self.head = last_linear(model)
        self.optimizer = make_optimizer(self.head, lr)
        self.batch_size, self.generator = batch_size, generator
        self._checked = False

    @torch.no_grad()
    def features(self, X: torch.Tensor) -> torch.Tensor:
        """The head's inputs for ``X``: the trunk in evaluation mode, in slices of 8,192 cells."""
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = [self.model(X[lo : lo + 8192]) for lo in range(0, len(X), 8192)]
        finally:
            hook.remove()
            self.model.train(was_training)
        feats = torch.cat(captured) if captured else X.new_zeros((0, self.head.in_features))
        if not self._checked and len(X):
            out = torch.cat(outputs)
            if out.shape != (len(X), self.head.out_features) or not torch.allclose(
                self.head(feats[: len(out)]).float(), out.float(), atol=1e-4, rtol=1e-3
            ):
                raise InputError(
                    "refit_heads: the model's output is not its last torch.nn.Linear layer's output; "
                    "refit_heads retrains that layer alone and needs it to be the model's head."
                )
            self._checked = True
        return feats

    def fit_chunk(self, X: torch.Tensor, targets: np.ndarray) -> float:
        """One epoch of the head over the chunk's cells; returns their mean training loss."""
        n = len(targets)
        if n == 0:
            return float("nan")
        feats = self.features(X).float()
        w = torch.as_tensor(self.objective.weights(self.objective.task_counts(targets)), dtype=torch.float32)
        w = w.to(feats.device)
        t = torch.from_numpy(np.ascontiguousarray(targets)).to(feats.device)
        order = torch.randperm(n, generator=self.generator).to(feats.device)
        total = torch.zeros((), device=feats.device)
        self.head.train()
        for lo in range(0, n, self.batch_size):
            idx = order[lo : lo + self.batch_size]
            loss = self.objective(self.head(feats[idx]), t[idx], w)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(idx)
        return float(total) / n
