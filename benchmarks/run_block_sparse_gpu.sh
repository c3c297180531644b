#!/usr/bin/env bash
# One GPU session for the block-sparse kernel: install, its tests on the GPU, then the benchmark.
# Usage on the GPU machine: bash benchmarks/run_block_sparse_gpu.sh [block_sparse_gpu.py options]; results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::UserWarning
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # every test of the two files on the GPU (real shapes, bf16), then the GPU-marked tests of the other kernels
  python3 -m pytest tests/kernels/test_block_sparse.py tests/kernels/test_attention.py -q -x -p no:warnings 2>&1 | tail -8 | tee "$OUT/gpu-tests.log"
  python3 -m pytest tests/kernels -q -x -m gpu -p no:warnings 2>&1 | tail -4 | tee -a "$OUT/gpu-tests.log"
fi
python3 benchmarks/block_sparse_gpu.py --output "$OUT/block-sparse.json" "$@" 2>"$OUT/bench.log"
tail -5 "$OUT/bench.log"
