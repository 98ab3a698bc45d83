#!/usr/bin/env bash
# Every training-step benchmark of issue 14 on the default JAX device (meant for one
# GPU: about 8 minutes on an H100/H200), in float32 and bfloat16, written as a markdown
# table that names the device. Arguments go to benchmarks/gpu.py (see its docstring):
#
#   bash benchmarks/gpu.sh                      # -> benchmarks/results/gpu.md
#   bash benchmarks/gpu.sh --out results.md --budget 420
#   EQP_BENCH_TINY=1 bash benchmarks/gpu.sh     # toy sizes: a check on any machine
#
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
