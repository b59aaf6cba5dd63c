"""`python -m sccoreset.demo`: the main job end to end on the bundled PBMC data.

Writes scanpy's 700 PBMCs as a class-incremental stream of files (sorted by cell type), fits the
gene space, runs ``tl.stream_train`` with per-step accuracy and macro-F1 on held-out cells, writes the
coreset ``.h5ad`` and predicts the held-out cells from the coreset read back from disk.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import anndata as ad

import sccoreset as scc


def main(argv: list[str] | None = None) -> None:
    """Run the demo; ``argv`` as on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="folder for the stream files and the coreset")
    p.add_argument("--buffer-size", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    stream = scc.datasets.pbmc_stream(out / "stream", n_files=5, random_state=args.seed)
    info = scc.pp.scan(stream.files, stream.label_key)
    print(f"stream: {len(stream.files)} files, {info.n_cells} cells, {len(info.labels)} cell types")
    print(info.summary().to_string())
    gene_space = scc.pp.fit_gene_space(stream.files, n_top_genes=500)
    coreset = scc.tl.stream_train(
        stream.files,
        stream.label_key,
        gene_space=gene_space,
        chunk_size=112,
        buffer_size=args.buffer_size,
        epochs_per_step=20,
        final_epochs=20,
        hidden=(128, 64),
        eval_data=stream.holdout,
        random_state=args.seed,
        progress=False,
    )
    hist = coreset.uns["sccoreset"]["history"]
    print("\nstep  accuracy  macro-F1  buffer")
    for i in range(len(hist["step"])):
        print(
            f"{i:>4}  {hist['accuracy'][i]:8.3f}  {hist['macro_f1'][i]:8.3f}  {hist['buffer_class_counts'][i].sum():>6}"
        )
    final = hist["final"]
    print(f"final {final['accuracy']:8.3f}  {final['macro_f1']:8.3f}  (after consolidation on the coreset)")
    path = out / "coreset.h5ad"
    coreset.write_h5ad(path)
    print(f"\ncoreset: {coreset.n_obs} cells x {coreset.n_vars} genes -> {path}")
    held = ad.read_h5ad(stream.holdout)
    scc.tl.predict(held, ad.read_h5ad(path))
    acc = (held.obs["sccoreset_prediction"].astype(str) == held.obs[stream.label_key].astype(str)).mean()
    print(f"held-out prediction from the saved coreset: accuracy {acc:.3f} on {held.n_obs} cells")


if __name__ == "__main__":
    main()
