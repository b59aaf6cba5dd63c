#!/usr/bin/env bash
# One GPU against two (issue 11), in one session on a machine with >= 2 GPUs:
#   bash benchmarks/gpu_scaling.sh OUTDIR [CELLS...]        (default cells: 1000000 5000000)
# For every stream size: bench_scale.py on one GPU, then the same under torchrun on two GPUs (NCCL), which
# prints the speed-up, the macro-F1 difference, each rank's shares and peak GPU memory, and checks that rank 0's
# coreset reads back and predicts. Then the command line under torchrun on the first stream, and
# `sccoreset predict` with the coreset it wrote. Figures go to OUTDIR/*.json, the log to stdout.
set -u
OUT=${1:-scaling_out}
shift || true
SIZES=${*:-1000000 5000000}
mkdir -p "$OUT"
# NVLink multicast stays off (the device machines require it)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
DATA=${SCALE_DATA:-/tmp/sccoreset_scale}
GENES=${GENES:-20000}
GS=$DATA/gene_space.npz  # the linked streams share their distinct files' gene space
mkdir -p "$DATA"
RUN="torchrun --standalone --nproc_per_node=2"
first=""
for cells in $SIZES; do
    echo "===== $cells cells: one GPU"
    timeout 300 python3 benchmarks/bench_scale.py --cells "$cells" --genes "$GENES" --data-dir "$DATA" --gene-space "$GS" \
        --json "$OUT/one_$cells.json"
    echo "===== $cells cells: two GPUs (torchrun)"
    timeout 300 $RUN benchmarks/bench_scale.py --cells "$cells" --genes "$GENES" --data-dir "$DATA" --gene-space "$GS" \
        --json "$OUT/two_$cells.json" --compare-to "$OUT/one_$cells.json" --out "$DATA/coreset_two_$cells.h5ad"
    first=${first:-$cells}
done
echo "===== the command line under torchrun (two GPUs), $first cells"
base=$(ls -d "$DATA"/g"$GENES"_c10000_d*_s0 | head -1)
links=$base/links_$((first / 10000))
start=$(date +%s.%N)
timeout 300 $RUN -m sccoreset train "$links"/*.h5ad --label-key cell_type --out "$DATA/cli.h5ad" --overwrite \
    --gene-space "$DATA/coreset_two_$first.h5ad" --quiet
end=$(date +%s.%N)
python3 -c "print(f'train under torchrun: {$first / ($end - $start):,.0f} cells/s including process start and imports')"
timeout 120 python3 -m sccoreset predict "$base"/holdout.h5ad --coreset "$DATA/cli.h5ad" \
    --out "$DATA/predicted.h5ad" --overwrite --quiet
python3 - "$DATA/predicted.h5ad" <<'EOF'
import sys

import anndata as ad
import numpy as np

a = ad.read_h5ad(sys.argv[1])
truth, pred = a.obs["cell_type"].astype(str).to_numpy(), a.obs["sccoreset_prediction"].astype(str).to_numpy()
f1 = [2 * np.sum((pred == c) & (truth == c)) / max(np.sum(pred == c) + np.sum(truth == c), 1) for c in np.unique(truth)]
print(f"CLI coreset (rank 0) read back by `sccoreset predict`: macro-F1 {np.mean(f1):.4f} on {a.n_obs:,} held-out cells")
EOF
