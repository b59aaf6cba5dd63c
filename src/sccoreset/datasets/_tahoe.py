"""A Tahoe-100M-like synthetic stream: cancer cell lines × drugs × mechanism of action, plates as files."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._synthetic import SyntheticStream, _sample_counts, write_file

TAHOE_LABEL_KEYS = ["cell_line", "drug", "moa_broad", "moa_fine"]
CONTROL_DRUG = "DMSO"
CONTROL_MOA_BROAD = "control"
CONTROL_MOA_FINE = "vehicle"

_TISSUES = [
    "Lung",
    "Breast",
    "Colon",
    "Pancreas",
    "Skin",
    "Ovary",
    "Kidney",
    "Brain",
    "Liver",
    "Stomach",
    "Bladder",
    "Cervix",
    "Prostate",
    "Bone",
    "Esophagus",
    "Uterus",
]
# broad mechanism of action -> fine mechanisms of action, in the order they are used
_MOA = {
    "kinase inhibitor": [
        "EGFR inhibitor",
        "MEK inhibitor",
        "CDK4/6 inhibitor",
        "PI3K inhibitor",
        "BCR-ABL inhibitor",
        "mTOR inhibitor",
    ],
    "DNA damage": [
        "topoisomerase inhibitor",
        "PARP inhibitor",
        "alkylating agent",
        "antimetabolite",
        "ATR inhibitor",
        "platinum compound",
    ],
    "epigenetic": [
        "HDAC inhibitor",
        "BET inhibitor",
        "DNMT inhibitor",
        "EZH2 inhibitor",
        "LSD1 inhibitor",
        "DOT1L inhibitor",
    ],
    "microtubule": ["tubulin destabilizer", "tubulin stabilizer", "kinesin inhibitor"],
    "proteostasis": ["proteasome inhibitor", "HSP90 inhibitor", "NEDD8 inhibitor"],
    "metabolic": ["DHODH inhibitor", "IDH inhibitor", "NAMPT inhibitor"],
}
_BROAD = list(_MOA)


def _signed_effect(rng, candidates, n, strength):
    """Gene indices and log fold changes of one program: ``n`` genes, magnitude about ``strength``, either sign."""
    genes = rng.choice(candidates, n, replace=False)
    effect = rng.normal(strength, 0.3 * strength, n) * rng.choice([-1.0, 1.0], n)
    return genes, effect


def _moa_names(n_moa_broad, n_moa_fine):
    broad = [_BROAD[b] if b < len(_BROAD) else f"MoA class {b + 1}" for b in range(n_moa_broad)]
    fine, fine_broad, used = [], [], [0] * n_moa_broad
    for j in range(n_moa_fine):
        b = j % n_moa_broad
        table = _MOA.get(broad[b], [])
        k = used[b]
        fine.append(table[k] if k < len(table) else f"{broad[b]} {k + 1}")
        fine_broad.append(b)
        used[b] += 1
    return broad, fine, np.array(fine_broad)


def _plate_windows(rng, n_files, n_drugs, drugs_per_plate):
    """Drugs of every plate: an overlapping window moving over a shuffled drug order, so drugs arrive gradually."""
    order = rng.permutation(n_drugs)
    starts = [(f * n_drugs) // n_files for f in range(n_files)]
    return [np.sort(order[(s + np.arange(drugs_per_plate)) % n_drugs]) for s in starts]


def tahoe_stream(
    directory: str | Path,
    *,
    n_files: int = 14,
    cells_per_file: int = 10_000,
    n_genes: int = 20_000,
    n_cell_lines: int = 12,
    n_drugs: int = 24,
    n_moa_fine: int = 8,
    n_moa_broad: int = 3,
    drugs_per_plate: int = 6,
    cell_line_strength: float = 1.5,
    copy_number_strength: float = 0.4,
    moa_broad_strength: float = 0.8,
    moa_fine_strength: float = 0.8,
    drug_strength: float = 0.8,
    weak_line_fraction: float = 0.25,
    nonresponder_fraction: float = 0.2,
    toxicity: float = 0.5,
    batch_strength: float = 0.25,
    library_size: float = 4000.0,
    dispersion: float = 2.0,
    missing_gene_fraction: float = 0.02,
    holdout_per_condition: int = 20,
    label_key: str = "cell_line",
    random_state: int = 0,
    overwrite: bool = False,
) -> SyntheticStream:
    """Write a seeded Tahoe-100M-like perturbation stream (plates as files) and a balanced held-out file.

    Four tasks share every cell (obs columns ``cell_line``, ``drug``, ``moa_broad``, ``moa_fine``,
    plus ``plate``; all categorical):

    * ``n_cell_lines`` cancer cell lines, each with a strong program of its own (``cell_line_strength``),
      a weaker one shared with the lines of its tissue and copy-number gains and losses over blocks of
      neighbouring genes (``copy_number_strength``): cell identity dominates the expression.
    * ``n_drugs`` drugs plus the vehicle ``"DMSO"``. Every drug belongs to one of ``n_moa_fine`` fine
      mechanisms of action (MoA), every fine MoA to one of ``n_moa_broad`` broad MoAs (``"kinase
      inhibitor"``, ``"DNA damage"``, ``"epigenetic"``, ...); DMSO has its own MoA
      (``"control"`` / ``"vehicle"``) and no effect. A drug's log fold changes are its broad MoA's
      program plus its fine MoA's program plus a drug-specific part, times a drug potency and a
      per-(cell line, broad MoA) sensitivity: ``weak_line_fraction`` of the lines respond weakly to
      everything, and ``nonresponder_fraction`` of treated cells respond at a fifth of the strength.
      Drugs also kill cells: a condition keeps about ``exp(-toxicity * response)`` of its cells.
    * ``n_files`` plates. Every plate holds every cell line, DMSO and ``drugs_per_plate`` drugs (a
      window moving over a shuffled drug order, so new drugs keep arriving: class-incremental for
      ``drug`` and partly for the MoAs), with a plate batch effect (gene-wise log fold changes and a
      library-size shift, ``batch_strength``). Every other plate lacks ``missing_gene_fraction`` of
      the genes and stores its genes in a shuffled order.

    Counts are negative binomial around a log-normal expression profile with log-normal library
    sizes, as in :func:`synthetic_stream`. The held-out file holds ``holdout_per_condition`` cells of
    every (cell line, drug) pair, each from a plate that holds its drug, so every class of every task
    appears in it.

    Files are reused when ``directory`` already holds a stream made with the same parameters (the
    mode is part of them).

    Returns
    -------
    A :class:`SyntheticStream` with ``label_keys`` (the four tasks; ``label_key`` is the first
    unless chosen), ``classes`` (every task's classes), ``drug_moa`` (drug -> its ``moa_fine`` and
    ``moa_broad``), ``plate_drugs`` (the drugs of every plate), ``sensitivity`` (cell line -> mean
    response) and ``types``/``lineage`` holding the cell lines and their tissue.
    """
    directory = Path(directory)
    params = {k: v for k, v in locals().items() if k not in ("directory", "overwrite")}
    params["mode"] = "tahoe"
    if label_key not in TAHOE_LABEL_KEYS:
        raise ValueError(f"label_key must be one of {TAHOE_LABEL_KEYS}, got {label_key!r}")
    if n_moa_broad < 1 or n_moa_fine < n_moa_broad or n_drugs < n_moa_fine:
        raise ValueError("need 1 <= n_moa_broad <= n_moa_fine <= n_drugs")
    if n_cell_lines < 1 or n_files < 1:
        raise ValueError("need at least one cell line and one plate")
    drugs_per_plate = max(min(drugs_per_plate, n_drugs), math.ceil(n_drugs / n_files))
    label_keys = [label_key] + [k for k in TAHOE_LABEL_KEYS if k != label_key]
    manifest = directory / "manifest.json"
    if manifest.exists() and not overwrite:
        saved = json.loads(manifest.read_text())
        if saved["params"] == params:
            saved["files"] = [Path(p) for p in saved["files"]]
            saved["holdout"] = Path(saved["holdout"])
            return SyntheticStream(**saved)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(random_state)
    genes = np.array([f"GENE{i:05d}" for i in range(n_genes)])
    base = rng.normal(0.0, 1.6, n_genes)
    # programs act on moderately to highly expressed genes
    candidates = np.flatnonzero(base > np.quantile(base, 0.5))
    small = max(1, candidates.size // 2)

    # cell lines: tissue program + line program + copy-number blocks
    n_tissues = min(len(_TISSUES), max(1, math.ceil(n_cell_lines / 2)))
    tissue_of = np.arange(n_cell_lines) % n_tissues
    lines = [f"{_TISSUES[t]}-{(tissue_of[: i + 1] == t).sum()}" for i, t in enumerate(tissue_of)]
    tissue = {name: _TISSUES[t] for name, t in zip(lines, tissue_of, strict=True)}
    line_lfc = np.zeros((n_cell_lines, n_genes))
    tissue_lfc = np.zeros((n_tissues, n_genes))
    for t in range(n_tissues):
        g, e = _signed_effect(rng, candidates, min(small, max(10, n_genes // 200)), 0.5 * cell_line_strength)
        tissue_lfc[t, g] = e
    arm = np.minimum(np.arange(n_genes) * 40 // n_genes, 39)
    for i in range(n_cell_lines):
        g = rng.choice(candidates, min(small, max(20, n_genes // 100)), replace=False)
        e = rng.normal(cell_line_strength, 0.3 * cell_line_strength, g.size) * rng.choice([-1, 1], g.size, p=[0.2, 0.8])
        cn = rng.choice([-1.0, 0.0, 1.0], 40, p=[0.15, 0.7, 0.15]) * copy_number_strength
        line_lfc[i] = tissue_lfc[tissue_of[i]] + cn[arm]
        line_lfc[i, g] += e

    # mechanisms of action and drugs
    broad, fine, fine_broad = _moa_names(n_moa_broad, n_moa_fine)
    n_prog = min(small, max(10, n_genes // 200))
    broad_lfc = np.zeros((n_moa_broad, n_genes))
    for b in range(n_moa_broad):
        g, e = _signed_effect(rng, candidates, n_prog, moa_broad_strength)
        broad_lfc[b, g] = e
    fine_lfc = np.zeros((n_moa_fine, n_genes))
    for j in range(n_moa_fine):
        g, e = _signed_effect(rng, candidates, n_prog, moa_fine_strength)
        fine_lfc[j, g] = e
    drug_fine = rng.permutation(np.arange(n_drugs) % n_moa_fine)
    drug_broad = fine_broad[drug_fine]
    potency = rng.lognormal(0.0, 0.25, n_drugs)
    drug_lfc = np.zeros((n_drugs, n_genes))
    for d in range(n_drugs):
        g, e = _signed_effect(rng, candidates, min(small, max(5, n_genes // 400)), drug_strength)
        drug_lfc[d] = broad_lfc[drug_broad[d]] + fine_lfc[drug_fine[d]]
        drug_lfc[d, g] += e
        drug_lfc[d] *= potency[d]
    drugs = [f"drug-{d + 1:02d}" for d in range(n_drugs)] + [CONTROL_DRUG]
    drug_moa = {drugs[d]: {"moa_fine": fine[drug_fine[d]], "moa_broad": broad[drug_broad[d]]} for d in range(n_drugs)}
    drug_moa[CONTROL_DRUG] = {"moa_fine": CONTROL_MOA_FINE, "moa_broad": CONTROL_MOA_BROAD}

    # sensitivity of every (cell line, broad MoA): weak lines respond weakly to everything
    weak = rng.permutation(n_cell_lines) < round(weak_line_fraction * n_cell_lines)
    line_sens = np.where(weak, rng.uniform(0.15, 0.35, n_cell_lines), rng.uniform(0.8, 1.2, n_cell_lines))
    sens = line_sens[:, None] * rng.lognormal(0.0, 0.25, (n_cell_lines, n_moa_broad))

    # profile rows: (cell line, drug, responder state); DMSO (index n_drugs) has no effect
    n_cond = n_drugs + 1
    scale = sens[:, drug_broad]  # (lines, drugs)
    lfc = np.empty((n_cell_lines, n_cond, 2, n_genes))
    lfc[:, :n_drugs, 0] = line_lfc[:, None] + scale[:, :, None] * drug_lfc[None]
    lfc[:, :n_drugs, 1] = line_lfc[:, None] + 0.2 * scale[:, :, None] * drug_lfc[None]
    lfc[:, n_drugs] = line_lfc[:, None]
    log_p = (base + lfc).reshape(-1, n_genes)
    response = np.zeros((n_cell_lines, n_cond))
    response[:, :n_drugs] = scale * potency[None]
    survival = np.exp(-toxicity * response)

    plates_of = _plate_windows(rng, n_files, n_drugs, drugs_per_plate)
    plates = [f"plate{f + 1:02d}" for f in range(n_files)]
    abundance = rng.lognormal(0.0, 0.3, n_cell_lines)
    batch_lfc = rng.normal(0.0, batch_strength, (n_files, n_genes))
    batch_lib = rng.lognormal(0.0, batch_strength, n_files)
    fine_names = fine + [CONTROL_MOA_FINE]
    broad_names = broad + [CONTROL_MOA_BROAD]
    cond_fine = np.append(drug_fine, n_moa_fine)
    cond_broad = np.append(drug_broad, n_moa_broad)

    def write(path, line, drug, plate, file_tag, drop_genes):
        n = line.size
        state = (rng.random(n) < nonresponder_fraction).astype(np.int64)
        rows = (line * n_cond + drug) * 2 + state
        library = rng.lognormal(np.log(library_size), 0.35, n) * batch_lib[plate]
        blocks, perm = [], []
        for b in np.unique(plate):
            sel = np.flatnonzero(plate == b)
            used, inv = np.unique(rows[sel], return_inverse=True)
            blocks.append(_sample_counts(rng, log_p[used], inv, library[sel], batch_lfc[b], dispersion))
            perm.append(sel)
        X = sp.vstack(blocks, format="csr")[np.argsort(np.concatenate(perm))]
        obs = pd.DataFrame(
            {
                "cell_line": pd.Categorical([lines[i] for i in line], categories=lines),
                "drug": pd.Categorical([drugs[d] for d in drug], categories=drugs),
                "moa_broad": pd.Categorical([broad_names[cond_broad[d]] for d in drug], categories=broad_names),
                "moa_fine": pd.Categorical([fine_names[cond_fine[d]] for d in drug], categories=fine_names),
                "plate": pd.Categorical([plates[p] for p in plate], categories=plates),
                "tissue": pd.Categorical([tissue[lines[i]] for i in line]),
            },
            index=[f"{file_tag}_cell{i:06d}" for i in range(n)],
        )
        write_file(path, X, obs, genes, rng, missing_gene_fraction, drop_genes)

    files = []
    for f in range(n_files):
        conds = np.append(plates_of[f], n_drugs)  # the plate's drugs and DMSO
        w = abundance[:, None] * rng.lognormal(0.0, 0.2, (n_cell_lines, 1)) * survival[:, conds]
        w = w * rng.lognormal(0.0, 0.15, (1, conds.size))
        counts = rng.multinomial(cells_per_file, (w / w.sum()).ravel()).reshape(w.shape)
        # every cell line and every drug of the plate gets at least one cell
        for i in np.flatnonzero(counts.sum(1) == 0):
            src = np.unravel_index(counts.argmax(), counts.shape)
            counts[src] -= 1
            counts[i, np.argmax(w[i])] += 1
        for k in np.flatnonzero(counts.sum(0) == 0):
            src = np.unravel_index(counts.argmax(), counts.shape)
            counts[src] -= 1
            counts[np.argmax(w[:, k]), k] += 1
        line = np.repeat(np.repeat(np.arange(n_cell_lines), conds.size), counts.ravel())
        drug = np.repeat(np.tile(conds, n_cell_lines), counts.ravel())
        p = rng.permutation(line.size)
        path = directory / f"plate_{f:03d}.h5ad"
        write(path, line[p], drug[p], np.full(line.size, f), f"p{f:03d}", missing_gene_fraction > 0 and f % 2 == 1)
        files.append(path)

    # held-out: every (cell line, drug) pair, each cell from a plate holding its drug
    line = np.repeat(np.arange(n_cell_lines), n_cond * holdout_per_condition)
    drug = np.tile(np.repeat(np.arange(n_cond), holdout_per_condition), n_cell_lines)
    hosts = [[f for f in range(n_files) if d in plates_of[f]] for d in range(n_drugs)] + [list(range(n_files))]
    pick = rng.random(drug.size)
    plate = np.array([hosts[d][int(u * len(hosts[d]))] for d, u in zip(drug, pick, strict=True)], dtype=np.int64)
    p = rng.permutation(line.size)
    holdout = directory / "holdout.h5ad"
    write(holdout, line[p], drug[p], plate[p], "holdout", False)

    result = SyntheticStream(
        files=files,
        holdout=holdout,
        types=lines,
        lineage=tissue,
        late_type=None,
        rare_type=None,
        label_key=label_key,
        params=params,
        label_keys=label_keys,
        mode="tahoe",
        classes={
            "cell_line": lines,
            "drug": drugs,
            "moa_broad": broad_names,
            "moa_fine": fine_names,
        },
        drug_moa=drug_moa,
        plate_drugs={plates[f]: [drugs[d] for d in plates_of[f]] + [CONTROL_DRUG] for f in range(n_files)},
        sensitivity={lines[i]: round(float(sens[i].mean()), 4) for i in range(n_cell_lines)},
    )
    record = asdict(result)
    record["files"] = [str(p) for p in files]
    record["holdout"] = str(holdout)
    manifest.write_text(json.dumps(record, indent=1))
    return result
