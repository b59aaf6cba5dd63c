"""Continual-learning regularizers (online EWC, A-GEM): the rules on a tiny MLP and random data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sccoreset._config import StreamConfig
from sccoreset._engine._regularizers import AGEM, LayerwiseAGEM, OnlineEWC, Regularizer, make_regularizer

N_IN, N_OUT = 5, 3


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, 8), nn.LayerNorm(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, N_OUT))


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_IN, generator=g), torch.randint(N_OUT, (n, 1), generator=g)


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets[:, 0])


CLASS_W = torch.tensor([1.0, 2.0, 0.5])


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The engine's form: class-weighted mean of -log p(true class), by gather and indexing."""
    yb = targets[:, 0]
    log_p = torch.log_softmax(logits.float(), 1).gather(1, yb[:, None])[:, 0]
    w = CLASS_W[yb]
    return -(log_p * w).sum() / w.sum()


def host_reading_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss torch.func cannot vmap (it reads a value on the host)."""
    loss = ce(logits, targets)
    if loss.item() < 0:  # never true
        raise AssertionError
    return loss


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_fisher(model, X, t, loss_fn) -> list[torch.Tensor]:
    """Mean over cells of squared per-cell gradients, one backward per cell, in eval mode."""
    model.eval()
    params = list(model.parameters())
    out = [torch.zeros_like(p) for p in params]
    for i in range(X.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(X[i : i + 1]), t[i : i + 1]), params)
        for o, g in zip(out, grads, strict=True):
            o += g.square()
    model.train()
    return [o / X.shape[0] for o in out]


def naive_gradient(model, X, t, loss_fn) -> list[torch.Tensor]:
    model.eval()
    grads = torch.autograd.grad(loss_fn(model(X), t), list(model.parameters()))
    model.train()
    return [g.detach() for g in grads]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# -- construction --------------------------------------------------------------------------------


def test_make_regularizer_picks_the_class():
    assert make_regularizer(StreamConfig()) is None
    ewc = make_regularizer(StreamConfig(regularizer="ewc", ewc_lambda=3.0, ewc_decay=0.5, reference_size=17))
    assert type(ewc) is OnlineEWC
    assert (ewc.lam, ewc.decay, ewc.reference_size) == (3.0, 0.5, 17)
    agem = make_regularizer(StreamConfig(regularizer="agem", reference_size=9))
    assert type(agem) is AGEM and agem.reference_size == 9 and not agem.layerwise
    lw = make_regularizer(SimpleNamespace(regularizer="agem_layerwise", ewc_lambda=1, ewc_decay=1, reference_size=4))
    assert type(lw) is LayerwiseAGEM and lw.layerwise
    assert all(isinstance(r, Regularizer) for r in (ewc, agem, lw))
    with pytest.raises(ValueError, match="unknown"):
        make_regularizer(SimpleNamespace(regularizer="si"))


# -- online EWC ----------------------------------------------------------------------------------


def test_ewc_penalty_none_before_first_step_then_zero_at_anchor_and_positive_after_moving():
    model, (X, t) = mlp(), data(40)
    reg = OnlineEWC(lam=10.0, decay=0.9, reference_size=64)
    reg.begin_step(model, X[:0], t[:0], gen())
    assert reg.penalty(model) is None
    reg.end_step(model, X, t, ce, gen())
    assert model.training  # the Fisher is taken in eval mode, the former mode comes back
    assert float(reg.penalty(model).detach()) == 0.0  # parameters sit on the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    pen = reg.penalty(model)
    assert pen.requires_grad and float(pen.detach()) > 0
    assert OnlineEWC(lam=0.0).penalty(model) is None


def test_ewc_penalty_closed_form_and_its_gradient():
    model = nn.Linear(2, 1)
    reg = OnlineEWC(lam=4.0)
    state = {
        "kind": "ewc", "steps": 1, "names": ["weight", "bias"],
        "fisher": [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])],
        "anchor": [torch.tensor([[0.5, 0.0]]), torch.tensor([-1.0])],
    }  # fmt: skip
    reg.load_state_dict(state)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.5, -1.0]]))
        model.bias.copy_(torch.tensor([1.0]))
    pen = reg.penalty(model)
    # 4/2 * (1 * 1**2 + 2 * (-1)**2 + 3 * 2**2) = 2 * 15
    assert float(pen.detach()) == pytest.approx(30.0)
    pen.backward()  # lam * F * (theta - theta*)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[4.0, -8.0]]))
    torch.testing.assert_close(model.bias.grad, torch.tensor([24.0]))


@pytest.mark.parametrize("loss_fn", [ce, weighted_ce])
def test_fisher_matches_a_naive_per_cell_loop(loss_fn):
    model, (X, t) = mlp(), data(30)
    reg = OnlineEWC(reference_size=64)  # more than the cells: all of them
    reg.end_step(model, X, t, loss_fn, gen())
    for f, e in zip(reg.fisher, naive_fisher(model, X, t, loss_fn), strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)
    assert all(float(f.sum()) > 0 for f in reg.fisher)
    assert reg.steps == 1


def test_fisher_on_a_draw_of_reference_size_cells():
    model, (X, t) = mlp(), data(50)
    reg = OnlineEWC(reference_size=12)
    reg.end_step(model, X, t, ce, gen(5))
    idx = torch.randperm(50, generator=gen(5))[:12]  # the draw: distinct cells, from the step's generator
    for f, e in zip(reg.fisher, naive_fisher(model, X[idx], t[idx], ce), strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)


def test_fisher_falls_back_to_a_loop_when_vmap_fails():
    model, (X, t) = mlp(), data(20)
    reg = OnlineEWC(reference_size=64)
    with pytest.warns(RuntimeWarning, match="torch.func"):
        reg.end_step(model, X, t, host_reading_ce, gen())
    for f, e in zip(reg.fisher, naive_fisher(model, X, t, ce), strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)
    assert model.training


def test_online_decay_combines_fishers_and_reanchors():
    model = mlp()
    (X1, t1), (X2, t2) = data(20, seed=1), data(25, seed=2)
    reg = OnlineEWC(decay=0.7, reference_size=64)
    reg.end_step(model, X1, t1, ce, gen())
    f1 = naive_fisher(model, X1, t1, ce)
    storage = [f.data_ptr() for f in reg.fisher]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    reg.end_step(model, X2, t2, ce, gen())
    f2 = naive_fisher(model, X2, t2, ce)
    for f, a, b in zip(reg.fisher, f1, f2, strict=True):
        torch.testing.assert_close(f, 0.7 * a + b, rtol=1e-5, atol=1e-7)
    for a, p in zip(reg.anchor, model.parameters(), strict=True):
        assert torch.equal(a, p.detach()) and a.data_ptr() != p.data_ptr()
    assert [f.data_ptr() for f in reg.fisher] == storage  # updated in place (CUDA graphs keep valid pointers)
    assert reg.steps == 2


def test_ewc_state_dict_round_trip_weights_only():
    model, (X, t) = mlp(), data(30)
    reg = OnlineEWC(lam=5.0, reference_size=16)
    reg.end_step(model, X, t, ce, gen())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    back = OnlineEWC(lam=5.0, reference_size=16)
    back.load_state_dict(state)
    back.begin_step(model, X[:0], t[:0], gen())
    assert back.steps == 1 and back.names == reg.names
    torch.testing.assert_close(back.penalty(model), reg.penalty(model))
    before = [f.data_ptr() for f in reg.fisher]
    reg.load_state_dict(state)  # into existing tensors: in place
    assert [f.data_ptr() for f in reg.fisher] == before
    empty = OnlineEWC()
    empty.load_state_dict(OnlineEWC().state_dict())
    assert empty.penalty(model) is None
    with pytest.raises(ValueError, match="cannot be loaded"):
        AGEM().load_state_dict(state)
    with pytest.raises(ValueError, match="EWC state holds"):
        back.begin_step(nn.Linear(N_IN, N_OUT), X[:0], t[:0], gen())


# -- A-GEM ---------------------------------------------------------------------------------------


def agem_setup(cls=AGEM, n_mem: int = 24, reference_size: int = 64, seed: int = 0):
    model, (Xm, tm) = mlp(), data(n_mem, seed=7)
    reg = cls(reference_size=reference_size)
    reg.begin_step(model, Xm, tm, gen(seed))
    model.train()
    return model, reg, naive_gradient(model, Xm, tm, ce)


def noise_like(ref: list[torch.Tensor], scale: float, seed: int = 3) -> list[torch.Tensor]:
    g = gen(seed)
    return [scale * torch.randn(r.shape, generator=g) for r in ref]


def test_agem_projects_a_conflicting_gradient_onto_the_half_space():
    model, reg, ref = agem_setup()
    g = [-r + e for r, e in zip(ref, noise_like(ref, 0.05), strict=True)]
    assert dot(g, ref) < 0
    set_grads(model, g)
    reg.adjust_gradients(model, ce)
    after = grads_of(model)
    assert dot(after, ref) >= -1e-6 * dot(ref, ref)
    coef = dot(g, ref) / dot(ref, ref)
    for a, gi, r in zip(after, g, ref, strict=True):
        torch.testing.assert_close(a, gi - coef * r, rtol=1e-4, atol=1e-6)
    assert model.training


def test_agem_leaves_an_agreeing_gradient_exactly_as_it_was():
    model, reg, ref = agem_setup()
    g = [r + e for r, e in zip(ref, noise_like(ref, 0.05), strict=True)]
    assert dot(g, ref) > 0
    set_grads(model, g)
    reg.adjust_gradients(model, ce)
    # the reference backward did not leak into p.grad
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model), g, strict=True))


def test_agem_layerwise_applies_the_rule_per_tensor():
    model, reg, ref = agem_setup(LayerwiseAGEM)
    sign = [(-1.0) ** i for i in range(len(ref))]
    g = [s * r + e for s, r, e in zip(sign, ref, noise_like(ref, 0.01), strict=True)]
    set_grads(model, g)
    reg.adjust_gradients(model, ce)
    for s, a, gi, r in zip(sign, grads_of(model), g, ref, strict=True):
        d = float((gi * r).sum())
        if s > 0:
            assert d > 0 and torch.equal(a, gi)
        else:
            assert d < 0
            torch.testing.assert_close(a, gi - d / float(r.square().sum()) * r, rtol=1e-4, atol=1e-6)
            assert float((a * r).sum()) >= -1e-6 * float(r.square().sum())
    # the whole-vector rule would have changed every tensor, or none
    whole_model, whole, _ = agem_setup(AGEM)
    set_grads(whole_model, g)
    whole.adjust_gradients(whole_model, ce)
    changed = [not torch.equal(a, gi) for a, gi in zip(grads_of(whole_model), g, strict=True)]
    assert all(changed) or not any(changed)


def test_agem_skips_parameters_without_gradient():
    model, reg, ref = agem_setup()
    g = [-r for r in ref]
    set_grads(model, g)
    model[0].bias.grad = None
    reg.adjust_gradients(model, ce)
    assert model[0].bias.grad is None
    others = [(a.grad, r) for a, r in zip(model.parameters(), ref, strict=True) if a.grad is not None]
    assert abs(sum(float((a * r).sum()) for a, r in others)) <= 1e-5


def test_agem_draws_a_new_reference_minibatch_each_call():
    model, (Xm, tm) = mlp(), data(200, seed=7)

    def refs(seed):
        reg = AGEM(reference_size=8)
        reg.begin_step(model, Xm, tm, gen(seed))
        return [reg.reference_gradient(model, ce) for _ in range(3)]

    a, b = refs(0), refs(0)
    assert all(torch.equal(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    assert not torch.equal(a[0][0], a[1][0])  # new cells each call
    assert not torch.equal(a[0][0], refs(1)[0][0])  # the draw follows the generator


def test_agem_with_empty_memory_is_a_no_op():
    model, (X, t) = mlp(), data(10)
    reg = AGEM(reference_size=4)
    g = gen(0)
    state = g.get_state()
    reg.begin_step(model, X[:0], t[:0], g)
    grads = naive_gradient(model, X, t, ce)
    set_grads(model, [-x for x in grads])
    reg.adjust_gradients(model, ce)
    assert all(torch.equal(p.grad, -x) for p, x in zip(model.parameters(), grads, strict=True))
    assert torch.equal(g.get_state(), state)
    assert reg.penalty(model) is None
    reg.end_step(model, X, t, ce, g)  # lets go of the memory
    reg.adjust_gradients(model, ce)


def test_agem_state_dict_round_trip_weights_only():
    buf = io.BytesIO()
    torch.save(LayerwiseAGEM().state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state == {"kind": "agem_layerwise"}
    LayerwiseAGEM().load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be loaded"):
        AGEM().load_state_dict(state)


# -- torch.distributed ---------------------------------------------------------------------------

DDP_SCRIPT = """
import importlib.util, json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

spec = importlib.util.spec_from_file_location("regs", {module!r})
regs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regs)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {outdir!r} + "/store", rank=rank, world_size=2)
torch.set_num_threads(1)

def ce(logits, targets):
    return nn.functional.cross_entropy(logits, targets[:, 0])

def cells(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(3, (n, 1), generator=g)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

sizes = [6, 10]  # uneven shares
X, t = cells(sizes[rank], 10 + rank)
Xa, ta = torch.cat([cells(sizes[r], 10 + r)[0] for r in range(2)]), torch.cat([cells(sizes[r], 10 + r)[1] for r in range(2)])
out = {{"rank": rank}}

# EWC: the Fisher of all ranks' cells (each rank draws its own reference cells)
m = model()
ewc = regs.OnlineEWC(reference_size=64)
ewc._use_vmap = False  # the per-cell loop: torch.func's first call imports torch._dynamo (seconds); tested above
ewc.end_step(m, X, t, ce, torch.Generator().manual_seed(0))
sq, n = ewc.squared_gradients(m, Xa, ta, ce)  # no collective: the sums of this process
out["ewc"] = max(float((f - s / n).abs().max()) for f, s in zip(ewc.fisher, sq))

# A-GEM: the reference gradient of all ranks' memory, weighted by cells
agem = regs.AGEM(reference_size=64)
agem.begin_step(m, X, t, torch.Generator().manual_seed(0))
ref = agem.reference_gradient(m, ce)
full = torch.autograd.grad(ce(m(Xa), ta), list(m.parameters()))
out["agem"] = max(float((a - b).abs().max()) for a, b in zip(ref, full))

# a rank with an empty memory share still takes part; all empty: A-GEM is off everywhere
agem.begin_step(m, X[: 0 if rank == 0 else 4], t[: 0 if rank == 0 else 4], torch.Generator())
part = torch.autograd.grad(ce(m(Xa[6:10]), ta[6:10]), list(m.parameters()))  # rank 1's first 4 cells
out["agem_part"] = max(float((a - b).abs().max()) for a, b in zip(agem.reference_gradient(m, ce), part))
agem.begin_step(m, X[:0], t[:0], torch.Generator())
out["agem_off"] = not agem._active

# DDP under Join with uneven minibatches: joined ranks shadow A-GEM's all-reduce
net = model()
ddp = DistributedDataParallel(net)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
reg = regs.LayerwiseAGEM(reference_size=4)
reg.begin_step(net, X, t, torch.Generator().manual_seed(rank))
with Join([ddp, reg]):
    for i in range(3 + 2 * rank):
        loss = ce(ddp(X[i : i + 2]), t[i : i + 2])
        opt.zero_grad()
        loss.backward()
        reg.adjust_gradients(net, ce)
        opt.step()
reg.end_step(net, X, t, ce, torch.Generator())
out["params"] = [p.detach().flatten().tolist() for p in net.parameters()]
with open({outdir!r} + f"/rank{{rank}}.json", "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
"""


def test_under_torch_distributed_ranks_agree(tmp_path):
    module = Path(__file__).parents[1] / "src" / "sccoreset" / "_engine" / "_regularizers.py"
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(module=str(module), outdir=str(tmp_path))))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["ewc"] < 1e-6 and r["agem"] < 1e-6 and r["agem_part"] < 1e-6 and r["agem_off"]
    assert res[0]["params"] == res[1]["params"]  # the same projections on every rank, no hang
