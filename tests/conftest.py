from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sccoreset as scc
from sccoreset._utils import h5ad_safe_strings

matplotlib.use("Agg")

if int(pd.__version__.split(".")[0]) >= 3:
    # data built by the tests themselves (plain lists as names) must write under pandas 3's string dtype;
    # what sccoreset itself writes is checked without this in test_stream_train.py
    ad.settings.allow_write_nullable_strings = True


def random_counts(rng: np.random.Generator, n_obs: int, genes: list[str], *, density: float = 0.2) -> ad.AnnData:
    """Small AnnData of integer counts with a categorical label column."""
    X = sp.random(n_obs, len(genes), density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    labels = rng.choice(["a", "b", "c"], n_obs)
    obs = pd.DataFrame(
        {"label": pd.Categorical(labels), "score": rng.random(n_obs)}, index=[f"c{i}" for i in range(n_obs)]
    )
    return ad.AnnData(X=X, obs=h5ad_safe_strings(obs), var=h5ad_safe_strings(pd.DataFrame(index=genes)))


@pytest.fixture(scope="session")
def small_stream(tmp_path_factory) -> scc.datasets.SyntheticStream:
    """4 files × 300 cells × 400 genes, class-incremental, every other file missing genes in shuffled order."""
    d = tmp_path_factory.mktemp("small_stream")
    return scc.datasets.synthetic_stream(
        d, n_files=4, cells_per_file=300, n_genes=400, holdout_per_type=20, missing_gene_fraction=0.05, random_state=1
    )


@pytest.fixture(scope="session")
def small_gene_space(small_stream) -> scc.pp.GeneSpace:
    return scc.pp.fit_gene_space(small_stream.files, n_top_genes=100)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
