#!/usr/bin/env bash
# One call on a lent GPU machine (torch 2.11, Python 3.12, no package registry): builds sn_ext offline, then
#   0. the round modes (SN_EXT_CUDA_ROUND, csrc/cuda/launch.h: fused, the default; split, whose loops read W in
#      16-byte packs; split-scalar, the split round's earlier scalar loops; none had run on a GPU before) each against
#      the CPU kernels, u-first and v-first, each in a process of its own ($OUT/rounds_<mode>.json); every later step
#      runs with the first that passes in that order ($OUT/round_mode.json says which and why; so do the lines here
#      and summary.json);
#   1. the smoke step (benchmarks/gpu_smoke.py, ~1 minute): every op against the CPU kernels, cooperative vs phased
#      launches bit for bit, CUDA-graph capture and replay of both, one layer's time against `W * 1.0` and against
#      device copies: $OUT/smoke.json, written check by check, before anything long starts;
#   2. the CUDA and Triton tests;
#   3. the benchmark suite, one section per call;
#   4. $OUT/summary.json (benchmarks/gpu_summary.py), from which the README's GPU table is made back home:
#      python -m benchmarks.gpu_summary --out <the fetched $OUT> --readme README.md
# Each step has its own timeout; the whole stays near 8 minutes even when a step hangs.
#   OUT=gpu_results bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
status=0
{ nvidia-smi; python3 --version; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } \
  > "$OUT/env.txt" 2>&1

# Build in place (editable), so that tests run from the checkout import the compiled library.
if ! (time MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps --no-index -e .) > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python3 -m sn_ext.info | tee "$OUT/info.json"

# 0. The round modes, each alone: a wrong or crashing kernel costs its process, not the run. All three are checked
# (the smoke step times those that passed side by side), within 75 s in all. The later steps also leave out the tests
# that run a failed mode on purpose (-k "not <mode>"; "not split" leaves out split-scalar's too), which would fail
# again or, if it crashes, take the CUDA context of the other tests in their process down with them.
ROUND_MODES="fused split split-scalar"  # the order of preference (benchmarks/gpu_smoke.py: ROUND_MODES)
PASSED="" NOT_FAILED=""
round_start=$SECONDS
for mode in $ROUND_MODES; do
  left=$((75 - (SECONDS - round_start)))
  if [ "$left" -ge 5 ] && SN_EXT_CUDA_ROUND=$mode timeout "$left" python3 -m benchmarks.gpu_smoke --out "$OUT" \
    --only check_rounds > "$OUT/rounds_$mode.log" 2>&1; then
    PASSED="$PASSED $mode"
  else
    status=1
    NOT_FAILED="$NOT_FAILED and not ${mode%-scalar}"
    grep -E "^check +False" "$OUT/rounds_$mode.log" | cut -c1-400 | tail -5
  fi
done
# Writes round_mode.json (the mode, and why), says so on stderr, prints the mode.
# shellcheck disable=SC2086
ROUND=$(python3 -m benchmarks.gpu_summary --out "$OUT" --choose-round $PASSED) || { status=1; ROUND=split-scalar; }
[ "$ROUND" = fused ] || status=1
export SN_EXT_CUDA_ROUND=$ROUND

# 1. Smoke: if this fails, its JSON says where, and the rest still runs (each step its own timeout).
# shellcheck disable=SC2086
timeout 85 python3 -m benchmarks.gpu_smoke --out "$OUT" --time-rounds $PASSED > "$OUT/smoke.log" 2>&1 ||
  { status=1; echo "smoke: failed"; }
grep -E "^(check|timing) +(False|True)" "$OUT/smoke.log" | grep -v "^check  True" | cut -c1-400 | tail -30

# 2. Tests. The per-op test files: their "cuda-..." and "triton-..." cases run on the GPU here (-k picks them by id).
OP_TESTS="tests/test_power_iteration.py tests/test_spectral_normalize.py tests/test_spectral_normalize_backward.py"
# The CUDA kernels (the cuda cases, tests/test_cuda.py, the launch modes and size classes of
# tests/test_cuda_launch.py) and grouped mode (all of its file, CPU cases included); up to 20 failures listed, for
# one fix-and-rerun.
# shellcheck disable=SC2086
timeout 100 python3 -m pytest -q --maxfail=20 -rf -k "(cuda or grouped) and not triton$NOT_FAILED" \
  $OP_TESTS tests/test_spectral_normalize_grouped.py tests/test_cuda.py tests/test_cuda_launch.py \
  > "$OUT/test_cuda.log" 2>&1 || status=1
tail -25 "$OUT/test_cuda.log"
# The Triton backend on the GPU (full grid, opcheck, no host sync, torch.compile: the triton cases and
# tests/test_triton.py), backend choice, torch.compile.
# shellcheck disable=SC2086
timeout 80 python3 -m pytest -q -rs -k "triton or test_backends.py or test_compile.py" \
  $OP_TESTS tests/test_triton.py tests/test_backends.py tests/test_compile.py > "$OUT/test_triton.log" 2>&1 || status=1
tail -8 "$OUT/test_triton.log"

# 3. The benchmark suite (python -m benchmarks), one section per call so that each has its own timeout: a section
# stopped by its timeout keeps the rows it wrote (CSVs are written row by row), and the last call rebuilds
# report.md and the plots from whatever is there. ~2.5 minutes at most; "torch compiled" compiles once per shape,
# dtype and mode; the GAN section times eager G and D first, then compiles them (what did not finish by the
# timeout is missing from its table). The layer section times the train (forward + backward) and eval modes only:
# the forward-only and backward-only modes would double it past its budget (run them with --mode on a later call).
BENCH="$OUT/bench"
for section in layer:60 layers:20 bandwidth:15 gan:45; do
  modes=""
  [ "${section%:*}" = layer ] && modes="--mode train --mode eval"
  # shellcheck disable=SC2086
  timeout "${section#*:}" python3 -m benchmarks --device cuda --only "${section%:*}" $modes --out "$BENCH" \
    > "$OUT/bench_${section%:*}.log" 2>&1 || { status=1; echo "bench ${section%:*}: failed or timed out"; }
done
python3 -m benchmarks --device cuda --report-only --out "$BENCH" > "$OUT/bench_report.log" 2>&1 || status=1
tail -5 "$OUT"/bench_*.log

# 4. One summary (smoke checks and timings, each test log's last line) for the README's GPU table.
python3 -m benchmarks.gpu_summary --out "$OUT" || status=1
exit $status
