"""The CUDA-graph trainer's arithmetic, run eagerly on CPU: padded whole-epoch minibatches learn exactly what the
eager loop learns (the two-rank all-reduce is tested in test_distributed.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sccoreset._engine._graphs import GraphedTrainer
from sccoreset._engine._model import build_model, mlp_spec
from sccoreset._engine._objective import Objective
from sccoreset._engine._train import make_optimizer, train_epochs


def _data(n, n_features=20, tasks=(4, 3), seed=0):
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.normal(size=(n, n_features)).astype(np.float32))
    targets = np.stack([rng.integers(0, c, n) for c in tasks], 1)
    return X, targets


@pytest.mark.parametrize(("n", "batch_size", "distill"), [(100, 16, 0.0), (97, 32, 1.0), (10, 64, 0.5), (64, 32, 0.0)])
def test_padded_epochs_equal_the_eager_loop(n, batch_size, distill):
    tasks = (4, 3)
    X, targets = _data(n, tasks=tasks)
    torch.manual_seed(0)
    model = build_model(mlp_spec(20, sum(tasks), (16,), dropout=0.0))  # padding draws dropout masks too
    twin = copy.deepcopy(model)
    objective = Objective(list(tasks))
    stored = torch.randn(n, sum(tasks))
    is_buffer = torch.arange(n) < n // 3
    torch.manual_seed(1)  # the same dropout masks in both runs
    eager_dyn, eager_losses = train_epochs(
        model, make_optimizer(model, 1e-2), X, torch.from_numpy(targets), epochs=3, batch_size=batch_size,
        generator=torch.Generator().manual_seed(5), objective=objective, distill=distill, stored_logits=stored,
        is_buffer=is_buffer,
    )  # fmt: skip
    trainer = GraphedTrainer(
        twin, make_optimizer(twin, 1e-2), capacity=n + 7, n_features=20, objective=objective,
        batch_size=batch_size, distill=distill, capture=False,
    )  # fmt: skip
    torch.manual_seed(1)
    dyn, losses = trainer.train(
        X, targets, epochs=3, generator=torch.Generator().manual_seed(5), stored_logits=stored, is_buffer=is_buffer
    )
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    for key, value in eager_dyn.to_numpy().items():
        np.testing.assert_allclose(dyn.to_numpy()[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
