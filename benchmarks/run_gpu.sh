#!/usr/bin/env bash
# Everything one GPU session runs, in one command (device time is scarce): install, GPU tests, benchmark.
# Usage on the GPU machine: bash benchmarks/run_gpu.sh [bench arguments...]; results land in $OUT.
# SKIP_TESTS=1 skips the GPU tests (for a second call on the same code).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::UserWarning
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest tests/kernels -q -m gpu -p no:warnings 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
  # the selections (shipped and candidate) at GPU shapes up to 128K: parametrized by device, not GPU-marked
  python3 -m pytest tests/kernels/test_triton.py -q -k select_tokens -p no:warnings 2>&1 | tail -5 \
    | tee "$OUT/gpu-select-tests.log"
  python3 benchmarks/sync_check.py 2>&1 | tee "$OUT/sync-check.log"
fi
tsa-patch bench --output "$OUT/bench.json" --plot "$OUT/speedup.png" "$@" 2>"$OUT/bench.log"
tail -45 "$OUT/bench.log"
