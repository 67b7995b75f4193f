#!/usr/bin/env bash
# One call on a lent GPU machine (torch 2.11, Python 3.12, no package registry): builds sn_ext offline, runs the
# CUDA tests and the benchmark suite, and leaves logs, CSVs, plots and the report ($OUT/bench/report.md) under
# $OUT. Each step has a timeout so that the whole script stays near 8 minutes even when a step hangs (build ~1-2 min,
# then at most 2 + 2 min of tests and 4 min of benchmarks).
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

# The CUDA kernels (one persistent launch per op) and grouped mode; up to 20 failures listed, for one fix-and-rerun.
timeout 150 python3 -m pytest -q --maxfail=20 -rf tests/test_cuda.py tests/test_grouped.py > "$OUT/test_cuda.log" 2>&1 \
  || status=1
tail -25 "$OUT/test_cuda.log"
# The Triton backend on the GPU (full grid, opcheck, no host sync, torch.compile), backend choice, torch.compile.
timeout 120 python3 -m pytest -q -rs tests/test_triton.py tests/test_backends.py tests/test_compile.py \
  > "$OUT/test_triton.log" 2>&1 || status=1
tail -8 "$OUT/test_triton.log"

# The benchmark suite (python -m benchmarks), one section per call so that each has its own timeout: a section
# stopped by its timeout keeps the rows it wrote (CSVs are written row by row), and the last call rebuilds
# report.md and the plots from whatever is there. ~4 minutes at most; "torch compiled" compiles once per shape,
# dtype and mode; the GAN section times eager G and D first, then compiles them (what did not finish by the
# timeout is missing from its table). The layer section times the train (forward + backward) and eval modes only:
# the forward-only and backward-only modes would double it past its budget (run them with --mode on a later call).
BENCH="$OUT/bench"
for section in layer:120 layers:30 bandwidth:20 gan:90; do
  modes=""
  [ "${section%:*}" = layer ] && modes="--mode train --mode eval"
  # shellcheck disable=SC2086
  timeout "${section#*:}" python3 -m benchmarks --device cuda --only "${section%:*}" $modes --out "$BENCH" \
    > "$OUT/bench_${section%:*}.log" 2>&1 || { status=1; echo "bench ${section%:*}: failed or timed out"; }
done
python3 -m benchmarks --device cuda --report-only --out "$BENCH" > "$OUT/bench_report.log" 2>&1 || status=1
tail -5 "$OUT"/bench_*.log
exit $status
