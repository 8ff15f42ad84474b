#!/usr/bin/env bash
# One prepared GPU check of the fused kernels (benchmarks/gpu_check.py): correctness
# against float64, then timings and a table. Needs a GPU, jax with CUDA, no network.
# Usage (repo root or anywhere): bash benchmarks/gpu_check.sh [gpu_check.py options]
# Fits in ~8 minutes; the log goes to benchmarks/gpu_check.log as well.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Prefer the installed package; fall back to the source tree when pip cannot install.
if ! "$PY" -c "import itq3s_jax, pallas_kernels" 2>/dev/null; then
  "$PY" -m pip install -e . --no-deps -q 2>/dev/null || echo "pip install failed: using PYTHONPATH=."
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
timeout 510 "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/gpu_check.log
exit "${PIPESTATUS[0]}"
