#!/usr/bin/env bash
# Accuracy of TSA + block-sparse on a real model on the GPU, where block-sparse layers run the Triton kernel
# (on CPU, calibrate and eval emulate it in PyTorch). Dense runs in the same process for every policy.
#
# Usage on the GPU machine (the project's dependencies and the corpora packages installed):
#   bash benchmarks/run_accuracy_gpu.sh MODEL LENGTHS SAMPLES CALIBRATION_LENGTH POLICY.json...
# For each POLICY: `tsa-patch eval MODEL --policy POLICY --lengths LENGTHS --samples SAMPLES`; then
# `tsa-patch calibrate MODEL --seq-len CALIBRATION_LENGTH --block-sparse` and the eval of the policy it chose.
# SEED (default 0) picks the suite's samples. Results (eval and calibration reports, logs, the card) in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out} SEED=${SEED:-0}
mkdir -p "$OUT"
model=$1 lengths=$2 samples=$3 calibration_length=$4
shift 4
command -v tsa-patch >/dev/null || { echo "tsa-patch is not on PATH: pip install -e . first"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

evaluate() {  # name policy
  local start=$SECONDS
  tsa-patch eval "$model" --policy "$2" --lengths "$lengths" --samples "$samples" --seed "$SEED" \
    --device cuda --output "$OUT/eval-$1-seed$SEED.json" >"$OUT/eval-$1-seed$SEED.log" 2>&1
  echo "eval $1: exit $? in $((SECONDS - start)) s"
  tail -n 25 "$OUT/eval-$1-seed$SEED.log" | grep -v '^\s*$' | tail -n 16
}

for policy in "$@"; do
  evaluate "$(basename "$policy" .json)" "$policy"
done

start=$SECONDS
tsa-patch calibrate "$model" --seq-len "$calibration_length" --block-sparse --device cuda \
  --output "$OUT/policy-calibrated-bs.json" --report "$OUT/calibration-bs.json" >"$OUT/calibrate.log" 2>&1
echo "calibrate --block-sparse: exit $? in $((SECONDS - start)) s"
tail -n 12 "$OUT/calibrate.log"
[ -f "$OUT/policy-calibrated-bs.json" ] && evaluate calibrated-bs "$OUT/policy-calibrated-bs.json"
