#!/usr/bin/env bash
# One-command GPU check (see benchmarks/gpu_check.py): build the CUDA extension, run every CUDA/Triton test and
# the GPU benchmarks, write gpu_check_report/gpu_check.{md,json}. Extra arguments go to gpu_check.py
# (--out DIR, --steps NAME..., --dry-run for the same steps on the CPU with tiny sizes).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PY" benchmarks/gpu_check.py "$@"
