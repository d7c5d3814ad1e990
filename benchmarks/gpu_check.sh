#!/usr/bin/env bash
# One command for a GPU machine (see benchmarks/gpu_check.py); exits 0 where no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/gpu_check.py "$@"
