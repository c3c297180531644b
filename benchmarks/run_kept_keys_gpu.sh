#!/usr/bin/env bash
# One device call for kept-keys attention (rows="all"), on a machine staged with the real model (~/stage):
# install, the kernel's tests at GPU shapes (and the block-sparse kernel's, which shares its online-softmax step),
# `calibrate --rows all` of Qwen2.5-Coder-0.5B at 32K with its export timed at 1K-32K (real_model_gpu.sh calibrate and
# speed, --only tsa-all-rows), then the kernel against cuDNN on random inputs (benchmarks/kept_keys_gpu.py).
# Results land in $OUT/kept-keys-results.tgz (packed after every step: a call's files back are few);
# ~/work keeps the export and policy for a later `real_model_gpu.sh eval`.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
RESULTS=${OUT:-/tmp/out}
export OUT=/tmp/kept-keys-results
mkdir -p "$OUT" "$RESULTS"
pack() { tar czf "$RESULTS/kept-keys-results.tgz" -C "$OUT" .; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest tests/kernels/test_kept_keys.py tests/kernels/test_block_sparse.py tests/kernels/test_sync_free.py \
  -q -p no:warnings 2>&1 | tail -6 | tee "$OUT/gpu-tests.log"
pack
bash benchmarks/real_model_gpu.sh calibrate --only tsa-all-rows
pack
bash benchmarks/real_model_gpu.sh speed --only tsa-all-rows
pack
python3 benchmarks/kept_keys_gpu.py --lengths "${LENGTHS:-8192,32768,131072}" --output "$OUT/kept-keys.json" 2>&1 \
  | tail -30
pack
