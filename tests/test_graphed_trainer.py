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


def test_steps_of_different_sizes_reuse_the_static_tensors_exactly():
    """A second, smaller merged set must not see the first one's rows (stale labels, masks or stored logits)."""
    tasks = (4, 3)
    torch.manual_seed(0)
    model = build_model(mlp_spec(20, sum(tasks), (16,), dropout=0.0))
    twin = copy.deepcopy(model)
    objective = Objective(list(tasks))
    eager_opt = make_optimizer(model, 1e-2)
    trainer = GraphedTrainer(
        twin, make_optimizer(twin, 1e-2), capacity=110, n_features=20, objective=objective, batch_size=16,
        distill=0.5, capture=False,
    )  # fmt: skip
    for n, seed in ((100, 0), (37, 1), (110, 2)):
        X, targets = _data(n, tasks=tasks, seed=seed)
        stored = torch.randn(n, sum(tasks))
        is_buffer = torch.arange(n) < n // 4
        eager_dyn, eager_losses = train_epochs(
            model, eager_opt, X, torch.from_numpy(targets), epochs=2, batch_size=16,
            generator=torch.Generator().manual_seed(seed), objective=objective, distill=0.5, stored_logits=stored,
            is_buffer=is_buffer,
        )  # fmt: skip
        dyn, losses = trainer.train(
            X, targets, epochs=2, generator=torch.Generator().manual_seed(seed), stored_logits=stored,
            is_buffer=is_buffer,
        )  # fmt: skip
        np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
        np.testing.assert_allclose(dyn.to_numpy()["aum"], eager_dyn.to_numpy()["aum"], rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_more_cells_than_the_capacity_is_an_error_not_a_padding_row():
    model = build_model(mlp_spec(20, 4, (16,)))
    trainer = GraphedTrainer(
        model, make_optimizer(model, 1e-2), capacity=50, n_features=20, objective=Objective([4]), batch_size=16,
        distill=0.0, capture=False,
    )  # fmt: skip
    X, targets = _data(51, tasks=(4,))
    kw = dict(
        epochs=1, generator=torch.Generator(), stored_logits=torch.zeros(51, 4), is_buffer=torch.zeros(51, dtype=bool)
    )
    with pytest.raises(ValueError, match="51 cells do not fit the trainer's capacity of 50"):
        trainer.train(X, targets, **kw)
    with pytest.raises(ValueError, match="capacity"):  # another rank's count too
        trainer.train(X[:10], targets[:10], **{**kw, "stored_logits": torch.zeros(10, 4),
                      "is_buffer": torch.zeros(10, dtype=bool)}, n_max=51)  # fmt: skip


@pytest.mark.parametrize("distill", [0.0, 0.7])
def test_unweighted_loss_and_a_first_chunk_without_buffer_cells_equal_the_eager_loop(distill):
    """balance_loss=False (unit class weights) and a merged set with no buffer cell (the first chunk's step)."""
    tasks = (3,)
    n = 45
    X, targets = _data(n, tasks=tasks, seed=3)
    torch.manual_seed(0)
    model = build_model(mlp_spec(20, 3, (16,), dropout=0.0))
    twin = copy.deepcopy(model)
    objective = Objective(list(tasks), balance_loss=False)
    stored = torch.randn(n, 3)
    is_buffer = torch.zeros(n, dtype=torch.bool)
    eager_dyn, eager_losses = train_epochs(
        model, make_optimizer(model, 1e-2), X, torch.from_numpy(targets), epochs=2, batch_size=16,
        generator=torch.Generator().manual_seed(2), objective=objective, distill=distill, stored_logits=stored,
        is_buffer=is_buffer,
    )  # fmt: skip
    trainer = GraphedTrainer(
        twin, make_optimizer(twin, 1e-2), capacity=n, n_features=20, objective=objective, batch_size=16,
        distill=distill, capture=False,
    )  # fmt: skip
    assert trainer.lean
    dyn, losses = trainer.train(
        X, targets, epochs=2, generator=torch.Generator().manual_seed(2), stored_logits=stored, is_buffer=is_buffer
    )
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    np.testing.assert_allclose(dyn.to_numpy()["aum"], eager_dyn.to_numpy()["aum"], rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
