#!/usr/bin/env bash
# One command on a 2-GPU machine: multi-GPU tests, then an 8B-shaped export under device_map and tensor
# parallelism. Results land in $OUT (and out/mg/multi_gpu.jsonl). STEP=make|device-map|tp|all.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::UserWarning
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" out/mg
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
STEP=${STEP:-all}
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
  python3 -m pytest tests/test_multi_gpu.py -q -x -p no:warnings 2>&1 | tail -15 | tee "$OUT/multigpu-tests.log"
fi
if [ "$STEP" = all ] || [ "$STEP" = make ]; then
  [ -d out/mg/export ] || python3 benchmarks/multi_gpu.py make out/mg 2>&1 | tail -5
fi
if [ "$STEP" = all ] || [ "$STEP" = device-map ]; then
  python3 benchmarks/multi_gpu.py device-map out/mg/export --lengths "${LENGTHS:-32768,131072}" 2>&1 | grep -v Warning | tail -8
fi
if [ "$STEP" = all ] || [ "$STEP" = tp ]; then
  torchrun --nproc_per_node 2 benchmarks/multi_gpu.py tp out/mg/export --lengths "${LENGTHS:-32768,131072}" 2>&1 | grep "^{" | tail -8
fi
cp out/mg/multi_gpu.jsonl "$OUT/" 2>/dev/null || true
