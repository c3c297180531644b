#!/usr/bin/env bash
# The real-model ground truth on a staged GPU machine (see benchmarks/README.md, "Real model"): one phase per
# device call, each well inside the 10-minute limit; ~/work keeps the exports and policies between calls.
#
#   bash benchmarks/real_model_gpu.sh calibrate     # the calibrations at 32K (--only: some), exports
#   bash benchmarks/real_model_gpu.sh speed         # prefill of each export at 1K-32K against dense, block densities
#   bash benchmarks/real_model_gpu.sh speed --bound # and against the dense model with the policy's layers'
#                                                   # attention skipped, and with all of it (Amdahl's bounds)
#   bash benchmarks/real_model_gpu.sh eval          # the suite at 8K/16K/32K for every policy
#   bash benchmarks/real_model_gpu.sh layers        # each layer alone made sparse, end to end at 32K
#   bash benchmarks/real_model_gpu.sh calibrate+speed --only NAME   # phases joined by "+": one call, in order
#
# Needs the nine chunks in ~/stage (tools/stage_real_model.sh) and .stage/wheels carried with the call.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TSA_PATCH_CACHE=$HOME/tsa-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$HOME/work"
gguf=$(bash benchmarks/assemble_real_model.sh) || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
for phase in ${1//+/ }; do  # phases joined by "+" run in order in one call, with the same options
  start=$SECONDS
  python3 benchmarks/real_model_gpu.py "$phase" --gguf "$gguf" --work "$HOME/work" --out "$OUT" "${@:2}" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/$phase.log" | tail -n 60
  code=${PIPESTATUS[0]}
  echo "$phase: exit $code in $((SECONDS - start)) s"
  [ "$code" -eq 0 ] || { status=$code; break; }
done
exit $status
