"""What is reproducible on a GPU: two CUDA runs with one seed, and a CUDA run against a CPU run.

python benchmarks/gpu_determinism.py
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

import sccoreset as scc


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    d = tempfile.mkdtemp()
    s = scc.datasets.synthetic_stream(d, n_files=6, cells_per_file=5000, n_genes=5000, holdout_per_type=100)
    gs = scc.pp.fit_gene_space(s.files, n_top_genes=2000)
    kw = dict(gene_space=gs, chunk_size=5000, buffer_size=300, eval_data=s.holdout, random_state=0, progress=False)
    runs = {}
    for name, dev in [("cuda #1", "cuda"), ("cuda #2", "cuda"), ("cpu", "cpu")]:
        t = time.perf_counter()
        runs[name] = scc.tl.stream_train(s.files, s.label_key, device=dev, **kw)
        h = runs[name].uns["sccoreset"]["history"]
        print(f"{name:8} {time.perf_counter() - t:6.1f} s  final macro-F1 {h['final']['macro_f1']:.4f}")

    def compare(a, b):
        ra, rb = runs[a], runs[b]
        same_cells = list(ra.obs_names) == list(rb.obs_names)
        overlap = len(set(ra.obs_names) & set(rb.obs_names)) / ra.n_obs
        la = ra.uns["sccoreset"]["history"]["train_loss"]
        lb = rb.uns["sccoreset"]["history"]["train_loss"]
        wa, wb = ra.uns["sccoreset"]["model"]["weights"], rb.uns["sccoreset"]["model"]["weights"]
        wdiff = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
        print(
            f"{a} vs {b}: identical coreset {same_cells}, cell overlap {overlap:.3f}, "
            f"max |loss diff| {np.abs(la - lb).max():.2e}, max |weight diff| {wdiff:.2e}"
        )

    compare("cuda #1", "cuda #2")
    compare("cuda #1", "cpu")


if __name__ == "__main__":
    main()
