"""CUDA: training on the GPU, and what is reproducible there. Skipped without CUDA (CI has none)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import sccoreset as scc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = dict(chunk_size=250, buffer_size=60, epochs_per_step=2, hidden=(32,), final_epochs=2, progress=False)


def test_cuda_run_predicts_and_same_seed_gives_same_coreset(small_stream, small_gene_space):
    runs = [
        scc.tl.stream_train(
            small_stream.files,
            "cell_type",
            gene_space=small_gene_space,
            device="cuda",
            eval_data=small_stream.holdout,
            random_state=1,
            **KW,
        )
        for _ in range(2)
    ]
    a, b = runs
    assert a.uns["sccoreset"]["params"]["device"] == "cuda"
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(
        a.uns["sccoreset"]["history"]["train_loss"], b.uns["sccoreset"]["history"]["train_loss"]
    )
    hold = ad.read_h5ad(small_stream.holdout)
    scc.tl.predict(hold, a)  # the stored weights are on the CPU: prediction needs no GPU
    acc = (hold.obs["sccoreset_prediction"].astype(str) == hold.obs["cell_type"].astype(str)).mean()
    # eval ran on the GPU, predict on the CPU: float differences may flip a borderline cell or two
    assert acc == pytest.approx(a.uns["sccoreset"]["history"]["final"]["accuracy"], abs=2 / hold.n_obs)


def test_a_model_already_on_cuda_is_accepted(small_stream, small_gene_space):
    from sccoreset._engine._model import build_model, mlp_spec

    model = build_model(mlp_spec(small_gene_space.n_genes, 12, (32,))).cuda()
    cs = scc.tl.stream_train(
        small_stream.files, "cell_type", gene_space=small_gene_space, model=model, device="cuda", **KW
    )
    assert cs.n_obs == KW["buffer_size"]


def test_a_model_with_batchnorm_trains_eagerly_on_cuda(small_stream, small_gene_space):
    """Padding rows of the graphed epochs would enter BatchNorm's statistics: such models train eagerly."""
    from sccoreset._io._sources import open_sources
    from sccoreset.tl._session import StreamRun

    n = small_gene_space.n_genes
    model = torch.nn.Sequential(
        torch.nn.Linear(n, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 12)
    )
    cfg = scc.tl.StreamConfig(device="cuda", **KW)
    with open_sources(small_stream.files) as sources:
        run = StreamRun(sources, "cell_type", cfg, gene_space=small_gene_space, model=model)
        assert not run.loop.use_graphs
        for _ in run.events_iter():
            pass
    assert run.coreset().n_obs == KW["buffer_size"]


def test_cuda_graphs_learn_like_eager_steps(small_stream, small_gene_space):
    f1 = {}
    for graphs in (True, False):
        cs = scc.tl.stream_train(
            small_stream.files, "cell_type", gene_space=small_gene_space, device="cuda", cuda_graphs=graphs,
            eval_data=small_stream.holdout, random_state=3, **{**KW, "epochs_per_step": 5, "final_epochs": 5},
        )  # fmt: skip
        f1[graphs] = cs.uns["sccoreset"]["history"]["final"]["macro_f1"]
    assert abs(f1[True] - f1[False]) < 0.15, f1


def test_multitask_on_cuda_graphs_like_eager(small_stream, small_gene_space):
    files = [*small_stream.files, small_stream.holdout]  # obs holds a second task: the lineage
    out = {}
    for graphs in (True, False):
        cs = scc.tl.stream_train(
            files[:-1], ["cell_type", "lineage"], gene_space=small_gene_space, device="cuda", cuda_graphs=graphs,
            eval_data=files[-1], random_state=3, **{**KW, "epochs_per_step": 5, "final_epochs": 5},
        )  # fmt: skip
        out[graphs] = cs.uns["sccoreset"]["history"]["tasks"]["lineage"]["macro_f1"][-1]
    assert abs(out[True] - out[False]) < 0.15, out
    assert out[True] > 0.6


@pytest.mark.parametrize("options", [{"regularizer": "ewc"}, {"regularizer": "agem"}, {"step_patience": 1}])
def test_eager_only_options_run_on_cuda(small_stream, small_gene_space, options):
    cs = scc.tl.stream_train(
        small_stream.files, "cell_type", gene_space=small_gene_space, device="cuda", **{**KW, **options}
    )
    assert cs.n_obs == KW["buffer_size"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ranks_cuda_graphs_agree_with_eager_ddp(small_stream, small_gene_space, tmp_path):
    """NCCL, two ranks with uneven shares (odd chunks): the graphed step (gradients all-reduced inside the graph,
    padded minibatches) keeps the ranks' weights identical, both hold the same coreset, and it learns like
    eager DDP."""
    import json
    import subprocess
    import sys
    import textwrap

    gs_path = tmp_path / "gs.npz"
    np.savez(gs_path, **small_gene_space.to_dict())
    kw = {**KW, "chunk_size": 251, "batch_size": 32, "epochs_per_step": 3, "final_epochs": 3, "random_state": 3}
    script = tmp_path / "ddp_gpu.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import faulthandler, json, os, numpy as np, torch, torch.distributed as dist, anndata as ad
            import sccoreset as scc
            faulthandler.dump_traceback_later(150, exit=True)  # a hang fails with every thread's stack
            rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl")
            gs = scc.pp.GeneSpace.from_dict(dict(np.load({str(gs_path)!r}, allow_pickle=False)))
            out = {{}}
            for graphs in (True, False):
                cs = scc.tl.stream_train({json.dumps([str(f) for f in small_stream.files])}, "cell_type",
                                         gene_space=gs, device=f"cuda:{{rank}}", cuda_graphs=graphs,
                                         eval_data={str(small_stream.holdout)!r}, **{kw!r})
                h = cs.uns["sccoreset"]["history"]
                hold = ad.read_h5ad({str(small_stream.holdout)!r})
                scc.tl.predict(hold, cs)
                out[str(graphs)] = {{"obs": list(map(str, cs.obs_names)), "n_local": int(h["n_local"].sum()),
                                    "n_chunk": int(h["n_chunk"].sum()), "f1": float(h["final"]["macro_f1"]),
                                    "pred": list(map(str, hold.obs["sccoreset_prediction"])),
                                    "loss": [float(x) for x in h["train_loss"]]}}
            with open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w") as fh:
                json.dump(out, fh)
            dist.destroy_process_group()
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for key in ("True", "False"):
        assert r0[key]["obs"] == r1[key]["obs"]  # one coreset
        assert r0[key]["n_local"] + r1[key]["n_local"] == r0[key]["n_chunk"]  # every cell read once
        assert r0[key]["pred"] == r1[key]["pred"]  # the ranks' weights stayed identical
        assert np.isfinite(r0[key]["loss"]).all()
    assert abs(r0["True"]["f1"] - r0["False"]["f1"]) <= 0.05, (r0["True"]["f1"], r0["False"]["f1"])


def test_fetching_the_next_chunk_during_training_changes_nothing(small_stream, small_gene_space, monkeypatch):
    """The next chunk is fetched and copied to the GPU while the GPU trains: the run equals a chunk-by-chunk one."""
    from sccoreset._engine._loop import StreamLoop

    fetched, uploads = [], []
    original = StreamLoop._fetch_ahead

    def spy(self, it):
        fetched.append(1)
        original(self, it)
        uploads.append(self._ahead[0] is not None and self._ahead[2] is not None)

    monkeypatch.setattr(StreamLoop, "_fetch_ahead", spy)
    kw = dict(gene_space=small_gene_space, device="cuda", random_state=3, **KW)
    ahead = scc.tl.stream_train(small_stream.files, "cell_type", **kw)
    n_steps = len(ahead.uns["sccoreset"]["history"]["step"])
    assert len(fetched) == n_steps  # every step fetched the next chunk (the last one found none)
    assert uploads == [True] * (n_steps - 1) + [False]  # ... and started its copy to the GPU (pinned memory)
    monkeypatch.setattr(StreamLoop, "look_ahead", False)
    plain = scc.tl.stream_train(small_stream.files, "cell_type", **kw)
    assert len(fetched) == n_steps
    assert list(ahead.obs_names) == list(plain.obs_names)
    for key in ("train_loss", "n_chunk"):
        np.testing.assert_array_equal(ahead.uns["sccoreset"]["history"][key], plain.uns["sccoreset"]["history"][key])
