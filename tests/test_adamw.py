"""The engine's AdamW (torch's fused kernel without torch.optim) is torch's AdamW, bit for bit."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from sccoreset._engine._adamw import FusedAdamW, fused_adamw_available

pytestmark = pytest.mark.skipif(
    not fused_adamw_available(torch.device("cpu")), reason="torch < 2.4 has no fused AdamW on CPU"
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))


def _train(model, opt, steps: int, seed: int = 1, set_to_none: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 37, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("slice_size", [None, 5, 100])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_same_weights_and_state_as_torch(slice_size, weight_decay):
    """Whole tensors (the CPU): bit for bit. Slices (what the GPU gets): the same arithmetic per value, up to
    the last bit where the CPU kernel's vectorised and scalar tails meet at other places."""
    ours, ref = _model(0), _model(0)
    opt = FusedAdamW(ours.parameters(), lr=3e-3, weight_decay=weight_decay, slice_size=slice_size)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=weight_decay, fused=True)
    _train(ours, opt, 7, set_to_none=False)
    _train(ref, ref_opt, 7, set_to_none=False)
    same = torch.equal if slice_size is None else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert same(a, b)
    mine, theirs = opt.state_dict(), ref_opt.state_dict()
    assert mine["state"].keys() == theirs["state"].keys()
    for k, st in mine["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert same(st[name], theirs["state"][k][name])


def test_state_dict_round_trips_with_torch():
    """A checkpoint written by torch's AdamW (earlier versions) resumes here, and the other way round."""
    ref, ours = _model(0), _model(0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, fused=True)
    _train(ref, ref_opt, 3)
    ours.load_state_dict(ref.state_dict())
    opt = FusedAdamW(ours.parameters(), lr=1.0)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 2e-3
    _train(ref, ref_opt, 4, seed=2)
    _train(ours, opt, 4, seed=2)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    back = _model(5)
    back.load_state_dict(ours.state_dict())
    back_opt = torch.optim.AdamW(back.parameters(), lr=1.0, fused=True)
    back_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch keeps the tensors it is given
    _train(back, back_opt, 2, seed=3)
    _train(ours, opt, 2, seed=3)
    for a, b in zip(ours.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        FusedAdamW(nn.Linear(2, 2).parameters()).load_state_dict(ref_opt.state_dict())


def test_zero_grad_and_no_gradients():
    model = _model(0)
    opt = FusedAdamW(model.parameters())
    opt.step()  # no gradients yet: nothing happens, no state
    assert not opt.state_dict()["state"]
    _train(model, opt, 1)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_training_does_not_import_dynamo():
    """torch.optim's constructor imports torch._dynamo (seconds at every start); the engine's loop does not."""
    code = (
        "import sys, numpy as np, torch\n"
        "from sccoreset._engine._model import build_model, mlp_spec\n"
        "from sccoreset._engine._train import make_optimizer, train_epochs\n"
        "m = build_model(mlp_spec(20, 3, (8,)))\n"
        "train_epochs(m, make_optimizer(m, 1e-3), torch.randn(50, 20), torch.randint(0, 3, (50,)), epochs=2,\n"
        "             batch_size=16, generator=torch.Generator().manual_seed(0), n_classes=3)\n"
        "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
