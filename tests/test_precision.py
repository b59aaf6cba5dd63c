"""bfloat16 autocast on CPUs that multiply bfloat16 natively, and the default MLP's fast CPU dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sccoreset._engine._model import Dropout, build_model, mlp_spec
from sccoreset._engine._precision import native_bf16_cpu, training_precision
from sccoreset._engine._train import make_optimizer, train_epochs


def test_precision_is_bf16_only_on_a_native_cpu_and_when_asked():
    cpu = torch.device("cpu")
    assert training_precision(cpu, False) == "32"
    assert training_precision(cpu, True) == ("bf16-mixed" if native_bf16_cpu() else "32")
    assert training_precision(torch.device("cuda"), True) == "32"


def _train(precision, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (4, 50)).astype(np.float32)
    y = rng.integers(0, 4, 600)
    X = torch.from_numpy(centers[y] + rng.normal(0, 1.0, (600, 50)).astype(np.float32))
    model = build_model(mlp_spec(50, 4, (32, 16)))
    opt = make_optimizer(model, 1e-2)
    _, losses = train_epochs(model, opt, X, torch.from_numpy(y), epochs=4, batch_size=64, n_classes=4,
                             generator=torch.Generator().manual_seed(seed), precision=precision)  # fmt: skip
    return model, losses


def test_bf16_mixed_training_keeps_float32_state_and_learns_as_float32_does():
    model, losses = _train("bf16-mixed")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    _, ref = _train("32")
    assert losses[-1] < 0.5 * losses[0]  # it learns
    np.testing.assert_allclose(losses, ref, rtol=0.05, atol=0.02)  # bf16 products: close, not equal


def test_stream_train_records_the_precision(small_stream, small_gene_space):
    import sccoreset as scc

    kw = dict(
        gene_space=small_gene_space, chunk_size=500, buffer_size=60, epochs_per_step=1, progress=False, device="cpu"
    )
    cs = scc.tl.stream_train(small_stream.files, small_stream.label_key, **kw)
    assert cs.uns["sccoreset"]["params"]["precision"] == ("bf16-mixed" if native_bf16_cpu() else "32")
    off = scc.tl.stream_train(small_stream.files, small_stream.label_key, cpu_bf16=False, **kw)
    assert off.uns["sccoreset"]["params"]["precision"] == "32"


def test_dropout_drops_its_share_scales_the_rest_and_follows_the_torch_seed():
    drop = Dropout(0.25).train()
    x = torch.ones(400, 500)
    torch.manual_seed(1)
    a = drop(x)
    assert abs(float((a == 0).float().mean()) - 0.25) < 0.01
    assert torch.all((a == 0) | torch.isclose(a, torch.tensor(1 / 0.75)))
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)  # torch.manual_seed fixes the masks
    assert not torch.equal(drop(x), a)  # and successive calls differ
    assert torch.equal(drop.eval()(x), x)


def test_dropout_gradient_flows_through_kept_units_only():
    drop = Dropout(0.5).train()
    x = torch.randn(64, 32, requires_grad=True)
    out = drop(x)
    out.sum().backward()
    kept = out != 0
    assert torch.allclose(x.grad[kept], torch.tensor(2.0))
    assert torch.all(x.grad[~kept] == 0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_edge_rates_are_torchs(p):
    x = torch.randn(8, 8)
    assert torch.equal(Dropout(p).train()(x), torch.nn.functional.dropout(x, p, True))
    assert Dropout(0.5).train()(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.skipif(not native_bf16_cpu(), reason="the merged set is built in bfloat16 only on a native-bf16 CPU")
def test_bf16_merged_workspace_trains_exactly_as_a_fresh_float32_merge(small_stream, small_gene_space, monkeypatch):
    """The loop writes buffer ∪ chunk straight into a reused bfloat16 workspace: same coreset, same losses as
    concatenating in float32 and casting (the values are the same), step after step."""
    import sccoreset as scc
    from sccoreset._engine._loop import StreamLoop

    kw = dict(gene_space=small_gene_space, chunk_size=300, buffer_size=80, epochs_per_step=2, hidden=(32,),
              progress=False, device="cpu")  # fmt: skip
    new = scc.tl.stream_train(small_stream.files, small_stream.label_key, **kw)
    with monkeypatch.context() as m:
        m.setattr(StreamLoop, "_merged", lambda self, bX, cX: torch.cat([bX, cX]))
        old = scc.tl.stream_train(small_stream.files, small_stream.label_key, **kw)
    assert new.uns["sccoreset"]["params"]["precision"] == "bf16-mixed"
    assert list(new.obs_names) == list(old.obs_names)
    np.testing.assert_array_equal(new.X, old.X)
    np.testing.assert_array_equal(new.uns["sccoreset"]["history"]["train_loss"],
                                  old.uns["sccoreset"]["history"]["train_loss"])  # fmt: skip
    # early stopping takes its held-out loss from the bfloat16 workspace, under autocast
    stopped = scc.tl.stream_train(small_stream.files, small_stream.label_key, step_patience=1, **kw)
    assert stopped.n_obs == kw["buffer_size"] and np.isfinite(stopped.uns["sccoreset"]["history"]["train_loss"]).all()
