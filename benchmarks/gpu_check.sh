#!/usr/bin/env bash
# One call on a lent GPU machine (torch 2.11, Python 3.12, no package registry), at most 7 minutes even when a step
# hangs: builds sn_ext offline, then checks each CUDA round mode against the CPU kernels, times the goals (one
# layer against plain, 4096x4096 against device copies, fused vs split and u-first vs v-first rounds, a grouped
# discriminator's launches), runs the smoke checks, the CUDA tests, and Triton (warm-up, reduced test grid,
# timings). The steps and their budgets: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh        # on the device tool: its $OUT gets gpu_check.tar.gz, summary.json, gpu_check.log
#
# Every result file goes to gpu_results/ (--results DIR), written as each step goes; after every step the whole folder
# is packed into $OUT (--out DIR), which is where the device tool brings files back from: do not set OUT yourself
# there. Back home: tar xzf gpu_check.tar.gz, then python -m benchmarks.gpu_summary --out gpu_results --readme README.md.
# SN_EXT_PREBUILT=1 skips the build (a compiled library for this machine's torch and Python is already in the checkout).
# The second script, benchmarks/gpu_bench.sh, runs the torch.compile tests and the benchmark sections.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_check --plan check "$@"
