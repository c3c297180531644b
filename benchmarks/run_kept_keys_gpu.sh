#!/usr/bin/env bash
# Device calls for kept-keys attention (rows="all"). Results land in $OUT/kept-keys-STEP.tgz (packed after every
# step: a call's files back are few).
#
#   bash benchmarks/run_kept_keys_gpu.sh tests       # the kernel's tests at GPU shapes: on a fresh machine Triton
#                                                    # compiles the kernel for every test's shape (on an H100 on
#                                                    # 2026-12-06, 50 of 54 passed in 540 s; warm, all 54 in 68 s),
#                                                    # so give this call the whole 10 minutes and rerun it warm
#   bash benchmarks/run_kept_keys_gpu.sh other-tests # the sync-free, block-sparse, TSA and attention GPU tests
#                                                    # (about 380 s on an H100 whose cache holds the kept-keys shapes)
#   bash benchmarks/run_kept_keys_gpu.sh profile     # the tests of the kernel's input step at GPU shapes, and one
#                                                    # sparse layer's device time stage by stage, and its kernels
#                                                    # (profile_kept_keys.py; KEEP=0.15 forces the kept fraction,
#                                                    # MODELS=qwen2.5-0.5b limits the shapes; with a carried
#                                                    # .baseline/tsa_patch, the same profile of that code too:
#                                                    # mkdir -p .baseline && git archive REV tsa_patch | tar x -C
#                                                    # .baseline)
#   bash benchmarks/run_kept_keys_gpu.sh kernel      # the kernel against cuDNN on random inputs (kept_keys_gpu.py)
#   bash benchmarks/run_kept_keys_gpu.sh kernel-tests  # the block-sparse kernel's tests and the kept-keys kernel's
#                                                      # input step, dense and poisoned-buffer tests at GPU shapes
#   bash benchmarks/run_kept_keys_gpu.sh fixed-cost  # what a sparse layer pays besides its attention: the profile
#                                                    # (as for profile, with the baseline), the block-sparse kernel's
#                                                    # default shape on both paths (block_tiling_gpu.py
#                                                    # --default-only; baseline too) and the selection's launch shapes
#                                                    # (select_shape_gpu.py)
#   bash benchmarks/run_kept_keys_gpu.sh scoring     # the scoring, selection, block-mass and sync-free tests at
#                                                    # GPU shapes, then the profile (as for profile; KEEP, LENGTHS; with a
#                                                    # carried .baseline, its profile too)
#   bash benchmarks/run_kept_keys_gpu.sh score-tiles # the scoring tests at GPU shapes, scoring's passes and pass 2's
#                                                    # launch shapes (score_tiles_gpu.py), then the profile (KEEP); a
#                                                    # carried .baseline's scoring and profile too
#   bash benchmarks/run_kept_keys_gpu.sh select-and-pass1  # the selection and scoring tests at GPU shapes, pass
#                                                    # 1's launch shapes (score_tiles_gpu.py --sweep-pass1), the
#                                                    # profile (KEEP; a carried .baseline's too). On a fresh H100
#                                                    # (2026-12-07) it took 550 s with select_shape_gpu.py at 8K and
#                                                    # 16K in it, which did not finish in 150 s: run that alone
#   bash benchmarks/run_kept_keys_gpu.sh select-variants  # the selection tests at GPU shapes, then for this tree, a
#                                                    # carried .baseline and every untracked exp/NAME/tsa_patch (and
#                                                    # benchmarks/variants/NAME.patch applied to a copy of this
#                                                    # tree's as exp/NAME): the radix selection alone
#                                                    # (select_variants_gpu.py, outputs compared with the first) and
#                                                    # the layer profile (LENGTHS, MODELS)
#   bash benchmarks/run_kept_keys_gpu.sh calibrate   # on a machine staged with the real model (~/stage): the
#                                                    # default calibration of Qwen2.5-Coder-0.5B at 32K (rows all,
#                                                    # 128 local keys, the front priced in time), its export
#                                                    # timed at 1K-32K
#                                                    # (real_model_gpu.sh, --only tsa-local-keys)
#
# ~/work keeps the export and policy for a later `real_model_gpu.sh eval --only tsa-local-keys`.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
RESULTS=${OUT:-/tmp/out}
export OUT=/tmp/kept-keys-$1
mkdir -p "$OUT" "$RESULTS"
pack() { tar czf "$RESULTS/kept-keys-$1.tgz" -C "$OUT" .; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
gpu_tests() {  # gpu_tests SECONDS FILE...: pytest within SECONDS, the log packed with the step's results
  timeout "$1" python3 -m pytest "${@:2}" -q -p no:warnings -o faulthandler_timeout=200 --durations=5 2>&1 \
    | tee -a "$OUT/gpu-tests.log" | tail -8
}
profiles() {  # profiles STEP: profile_kept_keys.py on this tree's runtime, then on a carried .baseline's
  for code in . .baseline; do
    [ -d "$code/tsa_patch" ] || continue
    name=$([ "$code" = . ] && echo current || echo baseline)
    PYTHONPATH=$code python3 benchmarks/profile_kept_keys.py --lengths "${LENGTHS:-8192,32768}" \
      --output "$OUT/profile-$name.json" ${KEEP:+--keep-fraction $KEEP} 2>&1 | grep -v "^    " | tail -8
    pack "$1"
  done
}
if [ "$1" = tests ]; then
  gpu_tests 560 tests/kernels/test_kept_keys.py
  pack tests
elif [ "$1" = other-tests ]; then
  gpu_tests 200 tests/kernels/test_sync_free.py
  gpu_tests 360 tests/kernels/test_block_sparse.py tests/kernels/test_tsa.py tests/kernels/test_attention.py
  pack other-tests
elif [ "$1" = profile ]; then
  gpu_tests "${TEST_SECONDS:-300}" tests/kernels/test_kept_keys.py -k "${TESTS:-prepare or never_read}"
  python3 benchmarks/profile_kept_keys.py --lengths "${LENGTHS:-8192,16384,32768}" --output "$OUT/profile.json" \
    ${KEEP:+--keep-fraction $KEEP} ${MODELS:+--models $MODELS} 2>&1 | tail -80
  if [ -d .baseline/tsa_patch ]; then  # the baseline's code first on the path: its kernels, the same script
    PYTHONPATH=.baseline python3 benchmarks/profile_kept_keys.py --lengths "${LENGTHS:-8192,16384,32768}" \
      --output "$OUT/profile-baseline.json" ${KEEP:+--keep-fraction $KEEP} ${MODELS:+--models $MODELS} 2>&1 | tail -40
  fi
  pack profile
elif [ "$1" = kernel-tests ]; then
  gpu_tests 280 tests/kernels/test_block_sparse.py -k "kernel or sub_tile or full_coverage"
  gpu_tests 280 tests/kernels/test_kept_keys.py -k "prepare or never_read or dense_causal"
  pack kernel-tests
elif [ "$1" = fixed-cost ]; then
  for code in . .baseline; do  # the same scripts on this tree's runtime, then on the carried baseline's
    [ -d "$code/tsa_patch" ] || continue
    name=$([ "$code" = . ] && echo current || echo baseline)
    PYTHONPATH=$code python3 benchmarks/profile_kept_keys.py --lengths "${LENGTHS:-8192,16384,32768}" \
      --output "$OUT/profile-$name.json" ${KEEP:+--keep-fraction $KEEP} 2>&1 | grep -v "^    " | tail -8
    PYTHONPATH=$code python3 benchmarks/block_tiling_gpu.py --default-only --lengths 32768 \
      --output "$OUT/block-tiling-$name.json" 2>&1 | tail -4
    pack fixed-cost
  done
  python3 benchmarks/select_shape_gpu.py --lengths "${SELECT_LENGTHS:-8192,16384,32768}" --output "$OUT/select-shape.json" \
    2>&1 | tail -30
  pack fixed-cost
elif [ "$1" = scoring ]; then
  gpu_tests 240 tests/kernels/test_triton.py -k "score or smooth or select"
  gpu_tests 120 tests/kernels/test_block_sparse.py -k "masses or selection_equals"
  gpu_tests 120 tests/kernels/test_sync_free.py
  pack scoring
  profiles scoring
elif [ "$1" = score-tiles ]; then
  gpu_tests 200 tests/kernels/test_triton.py -k score
  for code in . .baseline; do
    [ -d "$code/tsa_patch" ] || continue
    name=$([ "$code" = . ] && echo current || echo baseline)
    PYTHONPATH=$code timeout 200 python3 benchmarks/score_tiles_gpu.py --output "$OUT/score-tiles-$name.json" 2>&1 \
      | tail -30
    pack score-tiles
  done
  profiles score-tiles
elif [ "$1" = select-and-pass1 ]; then
  gpu_tests 200 tests/kernels/test_triton.py -k "select or smooth or score"
  timeout 150 python3 benchmarks/score_tiles_gpu.py --sweep "" --sweep-pass1 "64,128/64,128/4,8/2,4,8" \
    --output "$OUT/score-pass1.json" 2>&1 | tail -28
  pack select-and-pass1
  profiles select-and-pass1
elif [ "$1" = select-variants ]; then
  gpu_tests 300 tests/kernels/test_triton.py -k "select or radix"  # 200 s ran out compiling on a fresh H100
  pack select-variants
  for patch in benchmarks/variants/*.patch; do  # a variant kept as a patch of this tree's runtime
    name=exp/$(basename "$patch" .patch)
    [ -d "$name/tsa_patch" ] || { mkdir -p "$name" && cp -r tsa_patch "$name/" && patch -s -d "$name" -p1 <"$patch"; }
  done
  first=""  # the variant every other one's outputs are compared with
  for code in .baseline . exp/*; do
    [ -d "$code/tsa_patch" ] || continue
    name=$(basename "$(realpath "$code")")
    first=${first:-$name}
    PYTHONPATH=$code timeout 120 python3 benchmarks/select_variants_gpu.py "$name" "$OUT" 2>&1 | tail -12
    [ "$name" = "$first" ] || python3 benchmarks/select_variants_gpu.py --compare "$first" "$name" "$OUT"
    PYTHONPATH=$code timeout 150 python3 benchmarks/profile_kept_keys.py --lengths "${LENGTHS:-8192,32768}" \
      --output "$OUT/profile-$name.json" ${MODELS:+--models $MODELS} 2>&1 | grep -v "^    " | tail -8
    pack select-variants
  done
elif [ "$1" = kernel ]; then
  python3 benchmarks/kept_keys_gpu.py --lengths "${LENGTHS:-8192,32768,131072}" --output "$OUT/kept-keys.json" 2>&1 \
    | tail -30
  pack kernel
else
  bash benchmarks/real_model_gpu.sh calibrate --only tsa-local-keys
  pack calibrate
  bash benchmarks/real_model_gpu.sh speed --only tsa-local-keys
  pack calibrate
fi
