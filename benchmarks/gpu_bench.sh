#!/usr/bin/env bash
# The second call on a lent GPU machine, after benchmarks/gpu_check.sh (the same session if device time is left, or a
# later one), at most 7 minutes: builds sn_ext offline (SN_EXT_PREBUILT=1 skips it), runs the torch.compile tests,
# then the benchmark suite's GAN, layer and layers sections (python -m benchmarks), each under its own timeout, and
# the report. The steps and their budgets: benchmarks/gpu_check.py (plan "bench"); results as gpu_check.sh's.
#
#   bash benchmarks/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_check --plan bench "$@"
