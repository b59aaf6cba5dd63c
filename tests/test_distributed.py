"""Data-parallel training under torchrun (gloo, 2 processes on CPU): shares, one coreset, same accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sccoreset as scc
from sccoreset._engine._distributed import shard_chunk, shard_plan

KW = dict(chunk_size=300, buffer_size=100, epochs_per_step=10, final_epochs=10, hidden=(64,), progress=False)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A small class-incremental stream that both runs learn well, with 900 held-out cells: F1 is stable."""
    return scc.datasets.synthetic_stream(
        tmp_path_factory.mktemp("ddp"), n_files=4, cells_per_file=600, n_genes=500, n_lineages=3,
        subtypes_per_lineage=2, subtype_strength=1.5, rare_type=False, holdout_per_type=150, random_state=2,
    )  # fmt: skip


def torchrun_two_ranks(script) -> None:
    """Run ``script`` under ``torchrun --nproc_per_node=2`` (gloo on CPU); it must exit cleanly."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shards_are_disjoint_and_cover_the_chunk():
    chunk = [(0, 10, 25), (2, 0, 7), (1, 3, 4)]
    rows = [(f, r) for f, a, b in chunk for r in range(a, b)]
    for world in (1, 2, 3, 5):
        got = [(f, r) for rank in range(world) for f, a, b in shard_chunk(chunk, rank, world) for r in range(a, b)]
        assert got == rows  # in order, each row once
        sizes = [sum(b - a for _, a, b in shard_chunk(chunk, rank, world)) for rank in range(world)]
        assert max(sizes) - min(sizes) <= 1
    assert shard_plan([chunk, chunk], 0, 1) == [chunk, chunk]


def test_torchrun_two_ranks_share_the_reading_and_agree(stream, tmp_path):
    gs = scc.pp.fit_gene_space(stream.files, n_top_genes=200)
    gs_path = tmp_path / "gs.npz"
    np.savez(gs_path, **gs.to_dict())
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, numpy as np, torch.distributed as dist
            import sccoreset as scc
            dist.init_process_group("gloo")
            d = dict(np.load({str(gs_path)!r}, allow_pickle=False))
            gs = scc.pp.GeneSpace.from_dict(d)
            cs = scc.tl.stream_train({json.dumps([str(f) for f in stream.files])}, {stream.label_key!r}, gene_space=gs,
                                     eval_data={str(stream.holdout)!r}, **{KW!r})
            h = cs.uns["sccoreset"]["history"]
            out = {{"rank": dist.get_rank(), "obs": list(map(str, cs.obs_names)),
                   "n_local": int(h["n_local"].sum()), "n_chunk": int(h["n_chunk"].sum()),
                   "f1": float(h["final"]["macro_f1"]), "world": int(cs.uns["sccoreset"]["params"]["world_size"])}}
            with open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w") as fh:
                json.dump(out, fh)
            dist.destroy_process_group()
            """
        )
    )
    torchrun_two_ranks(script)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    total = results[0]["n_chunk"]
    assert results[0]["n_local"] + results[1]["n_local"] == total  # disjoint shares, every cell read once
    assert all(abs(r["n_local"] - total / 2) <= len(stream.files) * 2 for r in results)  # about half each
    assert results[0]["obs"] == results[1]["obs"]  # every rank holds the same coreset
    assert all(r["world"] == 2 for r in results)
    single = scc.tl.stream_train(stream.files, stream.label_key, gene_space=gs, eval_data=stream.holdout, **KW)
    f1_single = single.uns["sccoreset"]["history"]["final"]["macro_f1"]
    assert abs(results[0]["f1"] - f1_single) <= 0.02, (results[0]["f1"], f1_single)


@pytest.mark.parametrize(
    "options", [{"regularizer": "agem", "step_patience": 1}, {"regularizer": "ewc"}, {"chunk_size": 1199}]
)
def test_torchrun_eager_options_agree_across_ranks(stream, tmp_path, options):
    """Two tasks; A-GEM (an all-reduce per minibatch), EWC and within-step early stopping (an all-reduce per
    epoch) under two ranks with uneven shares, and a last chunk of one cell (one rank reads nothing): no hang,
    and both ranks end with the same coreset."""
    files = [str(f) for f in stream.files[:2]]
    kw = {**KW, "chunk_size": 301, "epochs_per_step": 3, "final_epochs": 1, "n_top_genes": 100, **options}
    script = tmp_path / "ddp_opts.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, torch.distributed as dist
            import sccoreset as scc
            dist.init_process_group("gloo")
            cs = scc.tl.stream_train({json.dumps(files)}, [{stream.label_key!r}, "lineage"], **{kw!r})
            with open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w") as fh:
                json.dump(list(map(str, cs.obs_names)), fh)
            dist.destroy_process_group()
            """
        )
    )
    torchrun_two_ranks(script)
    obs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert obs[0] == obs[1] and len(obs[0]) == KW["buffer_size"]


def test_graphed_trainer_two_ranks_with_uneven_cells_keep_identical_weights(tmp_path):
    """Rank 1 holds fewer cells than one minibatch's worth less than rank 0: it replays padding minibatches, and
    both ranks end with the same weights (the eager DDP path lets the ranks' optimizer states drift apart)."""
    script = tmp_path / "graphed_ddp.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, numpy as np, torch, torch.distributed as dist
            from sccoreset._engine._graphs import GraphedTrainer
            from sccoreset._engine._model import build_model, mlp_spec
            from sccoreset._engine._objective import Objective
            from sccoreset._engine._train import make_optimizer
            dist.init_process_group("gloo")
            rank = dist.get_rank()
            n = [90, 41][rank]
            rng = np.random.default_rng(rank)
            X = torch.from_numpy(rng.normal(size=(n, 20)).astype(np.float32))
            targets = rng.integers(0, 4, (n, 1))
            torch.manual_seed(rank)  # different initial weights: rank 0's are broadcast
            model = build_model(mlp_spec(20, 4, (16,), dropout=0.0))
            for p in model.parameters():
                dist.broadcast(p.data, 0)
            trainer = GraphedTrainer(model, make_optimizer(model, 1e-2), capacity=100, n_features=20,
                                     objective=Objective([4]), batch_size=16, distill=0.0, capture=False)
            dyn, losses = trainer.train(X, targets, epochs=3, generator=torch.Generator().manual_seed(rank),
                                        stored_logits=torch.zeros(n, 4), is_buffer=torch.zeros(n, dtype=torch.bool),
                                        n_max=90)
            flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
            stats = dyn.to_numpy()
            out = {{"flat": flat, "losses": losses, "n": len(stats["aum"]), "seen_ok": bool(np.all(np.isfinite(stats["aum"])))}}
            with open({str(tmp_path)!r} + f"/r{{rank}}.json", "w") as fh:
                json.dump(out, fh)
            dist.destroy_process_group()
            """
        )
    )
    torchrun_two_ranks(script)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["flat"] == r1["flat"]  # identical weights, bit for bit
    assert (r0["n"], r1["n"]) == (90, 41)  # dynamics of the real cells only, not the padding
    assert r0["seen_ok"] and r1["seen_ok"]
    assert all(np.isfinite(r0["losses"])) and all(np.isfinite(r1["losses"]))
    # the same arithmetic in one process: every minibatch's gradient is the mean of the ranks' masked losses'
    # gradients (a rank out of cells contributes zero); padding that leaked into a loss would move the weights
    np.testing.assert_allclose(r0["flat"], _two_rank_reference(), rtol=1e-4, atol=1e-6)


def _two_rank_reference() -> list[float]:
    from sccoreset._engine._model import build_model, mlp_spec
    from sccoreset._engine._objective import Objective
    from sccoreset._engine._train import host_orders, make_optimizer

    objective = Objective([4])
    torch.manual_seed(0)
    model = build_model(mlp_spec(20, 4, (16,), dropout=0.0))
    opt = make_optimizer(model, 1e-2)
    ranks = []
    for rank, n in enumerate((90, 41)):
        rng = np.random.default_rng(rank)
        X = torch.from_numpy(rng.normal(size=(n, 20)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, 4, (n, 1)))
        w = torch.from_numpy(objective.weights(objective.task_counts(y.numpy()))).float()
        ranks.append((X, y, w, host_orders(n, 3, torch.Generator().manual_seed(rank))))
    model.train()
    for epoch in range(3):
        for k in range(-(-90 // 16)):
            total = 0.0
            for X, y, w, orders in ranks:
                idx = orders[epoch, k * 16 : (k + 1) * 16]
                if len(idx):
                    total = total + objective(model(X[idx]), y[idx], w) / 2
            opt.zero_grad()
            if torch.is_tensor(total):
                total.backward()
            for p in model.parameters():  # the padded rank's zero gradient is part of the step
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
