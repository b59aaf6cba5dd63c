"""The Tahoe-100M-like mode of the synthetic generator: cell lines × drugs × MoA, plates as files."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sccoreset as scc

KEYS = ["cell_line", "drug", "moa_broad", "moa_fine"]
SMALL = dict(
    n_files=4,
    cells_per_file=700,
    n_genes=1000,
    n_cell_lines=6,
    n_drugs=8,
    n_moa_fine=4,
    n_moa_broad=2,
    drugs_per_plate=3,
    holdout_per_condition=8,
    random_state=3,
)


@pytest.fixture(scope="module")
def tahoe(tmp_path_factory):
    return scc.datasets.synthetic_stream(tmp_path_factory.mktemp("tahoe"), mode="tahoe", **SMALL)


@pytest.fixture(scope="module")
def tahoe_data(tahoe):
    return [ad.read_h5ad(p) for p in tahoe.files], ad.read_h5ad(tahoe.holdout)


def test_tasks_and_hierarchy(tahoe, tahoe_data):
    files, holdout = tahoe_data
    assert tahoe.mode == "tahoe"
    assert tahoe.label_keys == KEYS and tahoe.label_key == "cell_line"
    assert len(tahoe.classes["cell_line"]) == 6
    assert len(tahoe.classes["drug"]) == 9  # 8 drugs and DMSO
    assert len(tahoe.classes["moa_fine"]) == 5 and len(tahoe.classes["moa_broad"]) == 3
    assert tahoe.drug_moa["DMSO"] == {"moa_fine": "vehicle", "moa_broad": "control"}
    treated = {d: m for d, m in tahoe.drug_moa.items() if d != "DMSO"}
    assert "control" not in {m["moa_broad"] for m in treated.values()}
    assert "vehicle" not in {m["moa_fine"] for m in treated.values()}
    assert {m["moa_fine"] for m in treated.values()} == set(tahoe.classes["moa_fine"]) - {"vehicle"}
    fine_to_broad: dict[str, str] = {}
    for a in [*files, holdout]:
        for col in [*KEYS, "plate"]:
            assert isinstance(a.obs[col].dtype, pd.CategoricalDtype), col
        obs = a.obs[KEYS].astype(str)
        # each drug has exactly one fine MoA, each fine MoA exactly one broad MoA, as in drug_moa
        assert (obs.groupby("drug")["moa_fine"].nunique() == 1).all()
        assert (obs.groupby("moa_fine")["moa_broad"].nunique() == 1).all()
        assert (obs["moa_fine"] == obs["drug"].map(lambda d: tahoe.drug_moa[d]["moa_fine"])).all()
        assert (obs["moa_broad"] == obs["drug"].map(lambda d: tahoe.drug_moa[d]["moa_broad"])).all()
        for f, b in obs[["moa_fine", "moa_broad"]].drop_duplicates().itertuples(index=False):
            assert fine_to_broad.setdefault(f, b) == b


def test_plates_hold_all_lines_and_a_subset_of_drugs(tahoe, tahoe_data):
    files, _ = tahoe_data
    all_drugs = set(tahoe.classes["drug"])
    seen: set[str] = set()
    first_seen = []
    for a, (plate, drugs) in zip(files, tahoe.plate_drugs.items(), strict=True):
        assert a.n_obs == SMALL["cells_per_file"]
        assert set(a.obs["plate"].astype(str)) == {plate}
        assert set(a.obs["cell_line"].astype(str)) == set(tahoe.classes["cell_line"])
        on_plate = set(a.obs["drug"].astype(str))
        assert on_plate == set(drugs) and "DMSO" in on_plate
        assert on_plate < all_drugs  # a strict subset
        first_seen.append(len(on_plate - seen))
        seen |= on_plate
    assert seen == all_drugs
    assert sum(n > 0 for n in first_seen[1:]) >= 2  # new drugs keep arriving: class-incremental


def test_holdout_covers_every_class_of_every_task(tahoe, tahoe_data):
    _, holdout = tahoe_data
    obs = holdout.obs.astype(str)
    for key in KEYS:
        assert set(obs[key]) == set(tahoe.classes[key]), key
    # balanced over (cell line, drug), each cell from a plate holding its drug
    pairs = obs.groupby(["cell_line", "drug"]).size()
    assert len(pairs) == 6 * 9 and (pairs == SMALL["holdout_per_condition"]).all()
    assert all(d in tahoe.plate_drugs[p] for d, p in zip(obs["drug"], obs["plate"], strict=True))


def test_seeded_and_cached(tahoe, tmp_path):
    a = scc.datasets.tahoe_stream(tmp_path / "a", **SMALL)  # the function behind mode="tahoe": same stream
    X0 = ad.read_h5ad(tahoe.files[1])
    X1 = ad.read_h5ad(a.files[1])
    assert (X0.X != X1.X).nnz == 0 and (X0.var_names == X1.var_names).all()
    assert X0.obs.astype(str).equals(X1.obs.astype(str))
    h0, h1 = ad.read_h5ad(tahoe.holdout), ad.read_h5ad(a.holdout)
    assert (h0.X != h1.X).nnz == 0
    assert a.drug_moa == tahoe.drug_moa and a.plate_drugs == tahoe.plate_drugs
    # cached: the same parameters reuse the files, the manifest restores the ground truth
    mtime = a.files[0].stat().st_mtime_ns
    again = scc.datasets.synthetic_stream(tmp_path / "a", mode="tahoe", **SMALL)
    assert again.files[0].stat().st_mtime_ns == mtime
    assert again == a
    # the mode is part of the cache key: the cell-type stream rewrites the directory
    types = scc.datasets.synthetic_stream(
        tmp_path / "a", n_files=2, cells_per_file=100, n_genes=200, holdout_per_type=2, random_state=3
    )
    assert types.mode == "types" and types.label_keys == ["cell_type"] and "mode" not in types.params
    assert types.classes == {"cell_type": types.types}
    assert ad.read_h5ad(types.holdout).n_obs == 2 * 12


def test_other_seed_differs(tahoe, tmp_path):
    b = scc.datasets.synthetic_stream(tmp_path, mode="tahoe", **{**SMALL, "random_state": 4, "n_files": 1})
    assert ad.read_h5ad(b.files[0]).X.sum() != ad.read_h5ad(tahoe.files[0]).X.sum()


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="n_lineages"):
        scc.datasets.synthetic_stream(tmp_path, mode="tahoe", n_lineages=2)
    with pytest.raises(TypeError, match="n_drugs"):
        scc.datasets.synthetic_stream(tmp_path, n_drugs=3)
    with pytest.raises(ValueError, match="mode"):
        scc.datasets.synthetic_stream(tmp_path, mode="cells")
    with pytest.raises(ValueError, match="label_key"):
        scc.datasets.tahoe_stream(tmp_path, label_key="cell_type")


def _lognorm(a: ad.AnnData, genes) -> np.ndarray:
    x = a[:, genes].X.toarray()
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def test_tasks_are_learnable(tahoe, tahoe_data):
    """Nearest centroid on log1p-normalised counts: cell line is easy, drug and MoA well above chance."""
    files, holdout = tahoe_data
    genes = sorted(set.intersection(*(set(a.var_names) for a in files)))
    xtr = np.vstack([_lognorm(a, genes) for a in files])
    otr = pd.concat([a.obs for a in files]).astype(str)
    xte = _lognorm(holdout, genes)
    ote = holdout.obs.astype(str)
    mu, sd = xtr.mean(0), xtr.std(0) + 0.1
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd

    def nearest(groups, cols):
        keys, inv = np.unique(groups, return_inverse=True)
        centroids = np.stack([xtr[inv == k][:, cols].mean(0) for k in range(keys.size)])
        d = ((xte[:, None, cols] - centroids[None]) ** 2).sum(-1)
        return keys[d.argmin(1)]

    line = otr["cell_line"].to_numpy()
    acc = {"cell_line": np.mean(nearest(line, slice(None)) == ote["cell_line"].to_numpy())}
    # drug and MoA: centroids of (cell line, drug) conditions, as cell identity dominates the expression,
    # on the 100 genes that vary most between conditions once the cell lines' means are removed
    cond = (otr["cell_line"] + "|" + otr["drug"]).to_numpy()
    res = xtr.copy()
    for c in np.unique(line):
        res[line == c] -= res[line == c].mean(0)
    keys, inv = np.unique(cond, return_inverse=True)
    means = np.stack([res[inv == k].mean(0) for k in range(keys.size)])
    score = (means**2).mean(0) / (((res - means[inv]) ** 2).mean(0) + 1e-3)
    pred_drug = np.array([c.split("|")[1] for c in nearest(cond, np.argsort(score)[-100:])])
    hit = {"drug": pred_drug == ote["drug"].to_numpy()}
    for key in ("moa_broad", "moa_fine"):
        hit[key] = np.array([tahoe.drug_moa[d][key] for d in pred_drug]) == ote[key].to_numpy()
    acc.update({k: h.mean() for k, h in hit.items()})
    chance = {k: 1 / len(tahoe.classes[k]) for k in KEYS}
    majority = {k: ote[k].value_counts(normalize=True).max() for k in KEYS}
    print("nearest-centroid accuracy", acc, "chance", chance, "majority", majority)
    assert acc["cell_line"] > 0.9, acc
    assert acc["drug"] > 3 * chance["drug"], acc
    for key in ("drug", "moa_broad", "moa_fine"):
        assert acc[key] > max(2 * chance[key], majority[key] + 0.2), (key, acc, chance, majority)
    assert acc["drug"] < acc["cell_line"]  # drugs are the harder task
    # weakly responding cell lines hide their drugs
    weak = ote["cell_line"].map(tahoe.sensitivity).to_numpy() < 0.5
    assert weak.any() and (~weak).any()
    assert hit["drug"][~weak].mean() > hit["drug"][weak].mean() + 0.2


def test_writes_under_pandas_string_inference(tmp_path):
    if tuple(int(p) for p in pd.__version__.split(".")[:2]) < (2, 3) or not hasattr(
        ad.settings, "allow_write_nullable_strings"
    ):
        pytest.skip("string inference needs pandas >= 2.3 (or pyarrow), and the setting anndata >= 0.11.2")
    with pd.option_context("future.infer_string", True), ad.settings.override(allow_write_nullable_strings=False):
        s = scc.datasets.synthetic_stream(
            tmp_path, mode="tahoe", n_files=2, cells_per_file=100, n_genes=200, n_cell_lines=3, n_drugs=4,
            n_moa_fine=2, n_moa_broad=2, drugs_per_plate=2, holdout_per_condition=1,
        )  # fmt: skip
    assert ad.read_h5ad(s.holdout).n_obs == 3 * 5
