"""Streams of more files than the process may keep open (thousands of files on a cluster with a limit of 1,024
descriptors): the coreset build, the shuffled reader and the sampled fit keep a bounded number open."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run_with_many_files(tmp_path, n_obs: int, n_vars: int, before_limit: str, under_limit: str) -> str:
    """Write 150 files of ``n_obs`` x ``n_vars`` counts (2 descriptors each when open: 300 > the limit), run
    ``before_limit``, lower the descriptor limit to 160, run ``under_limit``, in a fresh process; its stdout."""
    script = tmp_path / "many.py"
    header = f"""
        import resource
        import anndata as ad, numpy as np, pandas as pd, scipy.sparse as sp
        import sccoreset as scc
        from sccoreset._utils import h5ad_safe_strings  # pandas 3's string dtype: anndata < 0.13 won't write it

        rng = np.random.default_rng(0)
        paths = []
        for i in range(150):
            X = sp.csr_matrix(rng.poisson(1.0, ({n_obs}, {n_vars})).astype(np.float32))
            obs = pd.DataFrame({{"cell_type": pd.Categorical(rng.choice(["a", "b"], {n_obs}))}},
                               index=[f"f{{i}}c{{j}}" for j in range({n_obs})])
            var = pd.DataFrame(index=[f"g{{k}}" for k in range({n_vars})])
            a = ad.AnnData(X=X, obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(var))
            paths.append({str(tmp_path)!r} + f"/f{{i:03d}}.h5ad")
            a.write_h5ad(paths[-1])
    """
    lower = """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, hard))
    """
    parts = (header, before_limit, lower, under_limit)
    script.write_text("\n".join(textwrap.dedent(part) for part in parts))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_coreset_build_stays_under_the_open_file_limit(tmp_path):
    out = _run_with_many_files(
        tmp_path, 4, 12, "",
        """
        from sccoreset._engine._buffer import SCORE_NAMES
        from sccoreset._io._sources import open_sources
        from sccoreset.tl._coreset import _counts_on, _obs

        files = np.repeat(np.arange(150), 2)
        rows = np.tile([1, 3], 150)
        prov = {"file": files, "row": rows, "chunk": files // 10, "step_added": files // 10}
        buffer = type("B", (), {"provenance": prov, "scores": {k: np.zeros(300) for k in SCORE_NAMES},
                                "targets": np.zeros((300, 0), np.int64), "__len__": lambda self: 300})()
        with open_sources(paths) as sources:
            maps = [np.arange(12) for _ in sources]
            counts = _counts_on(sources, buffer, 12, maps)
            obs = _obs(sources, buffer, {}, "sccoreset")
            want = np.concatenate([ad.read_h5ad(p).X[[1, 3]].toarray() for p in paths])
            assert np.array_equal(counts.toarray(), want)
            assert list(obs.index[:4]) == ["f0c1", "f0c3", "f1c1", "f1c3"]
            print("ok", counts.shape, obs.shape)
        """,
    )  # fmt: skip
    assert "ok (300, 12)" in out


def test_shuffled_reading_of_many_files_stays_under_the_open_file_limit(tmp_path):
    """Block-shuffled chunks touch every file early and finish each late: the reader keeps a bounded number open."""
    out = _run_with_many_files(
        tmp_path, 40, 30,
        """
        gs = scc.pp.fit_gene_space(paths, n_top_genes=10)
        want = np.concatenate([c.X for c in scc.pp.iter_chunks(paths, gs, chunk_size=500, order="block_shuffle",
                                                               block_size=8, n_workers=2)])
        """,
        """
        for workers in (1, 2):
            got = np.concatenate([c.X for c in scc.pp.iter_chunks(paths, gs, chunk_size=500, order="block_shuffle",
                                                                  block_size=8, n_workers=workers)])
            assert np.array_equal(got, want)
        sampled = scc.pp.fit_gene_space(paths, n_top_genes=10, max_cells=3000, n_workers=2)  # random blocks
        assert sampled.n_genes == 10
        print("ok", got.shape)
        """,
    )  # fmt: skip
    assert "ok (6000, 10)" in out


def test_a_close_waits_for_positioned_reads_in_flight(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from sccoreset._io._sources import as_sources

    path = tmp_path / "a.h5ad"
    ad.AnnData(X=sp.random(20, 5, density=0.5, format="csr", dtype="float32")).write_h5ad(path)
    (src,) = as_sources([path])
    src.read_rows(0, 5)
    assert src._handle is not None
    src._busy = 1  # a reader thread between its preadv calls
    src.close()
    assert src._handle is not None and src._close_pending  # deferred
    with src._lock:  # what the reader does after its reads
        src._busy -= 1
        src.close()
    assert src._handle is None and not src._close_pending


def test_label_scans_of_many_files_stay_under_the_open_file_limit(tmp_path):
    """The whole-file label scans (missing-label count, budget totals, splits) close what they open beyond the
    budget: with labels, a stream of more files than the limit allows trains (it ran out of descriptors)."""
    out = _run_with_many_files(
        tmp_path, 40, 30,
        "gs = scc.pp.fit_gene_space(paths, n_top_genes=10)",
        """
        n = sum(len(c.labels) for c in scc.pp.iter_chunks(paths, gs, chunk_size=500, label_key="cell_type"))
        held = scc.pp.stratified_split(paths, "cell_type", fraction=0.1)
        assert len(held) == 150 and sum(int(h.sum()) for h in held) > 0
        cs = scc.tl.stream_train(paths, "cell_type", gene_space=gs, chunk_size=500, buffer_size=100, progress=False)
        print("ok", n, cs.n_obs)
        """,
    )  # fmt: skip
    assert "ok 6000 100" in out
