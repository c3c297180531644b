#!/usr/bin/env bash
# One device call for kept-keys attention (rows="all"), on a machine staged with the real model (~/stage):
# install, the kernel's tests at GPU shapes (and the block-sparse kernel's, which shares its online-softmax step),
# the kernel against cuDNN (benchmarks/kept_keys_gpu.py), then each layer of Qwen2.5-Coder-0.5B alone made sparse
# at 32K with the paper's rows and with every row kept (real_model_gpu.sh layers). Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest tests/kernels/test_kept_keys.py tests/kernels/test_block_sparse.py tests/kernels/test_sync_free.py \
  -q -p no:warnings -x 2>&1 | tail -6 | tee "$OUT/gpu-tests.log"
python3 benchmarks/kept_keys_gpu.py --lengths "${LENGTHS:-8192,16384,32768,131072}" --output "$OUT/kept-keys.json" \
  2>&1 | tail -30
bash benchmarks/real_model_gpu.sh layers --samples 2 --layer-rows kept,all --layer-taus "${LAYER_TAUS:-0.005,0.02}" \
  --no-layer-block
