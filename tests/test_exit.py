"""A script that fails inside a chunk loop exits: the reading threads stop before the interpreter finalizes.

Before, the uncaught error's traceback kept the chunk generator alive until the interpreter's finalization,
which had frozen the reading threads (daemons) while one held h5py's lock: closing the files then waited
forever, and the user's script never exited.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_an_error_inside_a_chunk_loop_ends_the_process(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import anndata as ad, numpy as np, pandas as pd, scipy.sparse as sp
            import sccoreset as scc
            from sccoreset._utils import h5ad_safe_strings  # pandas 3's string dtype: anndata < 0.13 won't write it

            rng = np.random.default_rng(0)
            paths = []
            for i in range(40):
                X = sp.csr_matrix(rng.poisson(1.0, (40, 30)).astype(np.float32))
                obs = pd.DataFrame({{"cell_type": pd.Categorical(rng.choice(["a", "b"], 40))}},
                                   index=[f"f{{i}}c{{j}}" for j in range(40)])
                var = pd.DataFrame(index=[f"g{{k}}" for k in range(30)])
                a = ad.AnnData(X=X, obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(var))
                paths.append({str(tmp_path)!r} + f"/f{{i:03d}}.h5ad")
                a.write_h5ad(paths[-1])
            gs = scc.pp.fit_gene_space(paths, n_top_genes=10)
            n = sum(len(c.no_such_attribute) for c in scc.pp.iter_chunks(paths, gs, chunk_size=100, n_workers=2))
            """
        )
    )
    for _ in range(3):  # the hang was likely, not certain
        try:
            done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as e:
            raise AssertionError("the process did not exit after an error inside the chunk loop") from e
        assert done.returncode == 1
        assert "no_such_attribute" in done.stderr
