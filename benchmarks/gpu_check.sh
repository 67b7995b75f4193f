#!/usr/bin/env bash
# One call on a lent GPU machine (torch 2.11, Python 3.12, no package registry): builds sn_ext offline, runs the
# CUDA tests and the GPU benchmarks, and leaves logs and CSVs under $OUT. Each step has a timeout so that the whole
# script stays near 8 minutes even when a step hangs (build ~1-2 min, then at most 2 + 2 + 2 + 1 min).
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

timeout 120 python3 -m pytest -q -x tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1 || status=1
tail -5 "$OUT/test_cuda.log"
# The Triton backend on the GPU (full grid, opcheck, no host sync, torch.compile), backend choice, torch.compile.
timeout 120 python3 -m pytest -q -rs tests/test_triton.py tests/test_backends.py tests/test_compile.py \
  > "$OUT/test_triton.log" 2>&1 || status=1
tail -8 "$OUT/test_triton.log"

# float32 over every baseline shape, bfloat16 over the small ones; "torch compiled" compiles once per shape.
timeout 120 python3 -m benchmarks.layer --device cuda --dtype float32 --out "$OUT/layer_cuda_float32.csv" \
  > "$OUT/layer_cuda_float32.md" 2>&1 || status=1
timeout 60 python3 -m benchmarks.layer --device cuda --dtype bfloat16 --quick --out "$OUT/layer_cuda_bfloat16.csv" \
  > "$OUT/layer_cuda_bfloat16.md" 2>&1 || status=1
tail -12 "$OUT/layer_cuda_float32.md" "$OUT/layer_cuda_bfloat16.md"
exit $status
