#!/usr/bin/env bash
# The first GPU run of rankprune in one budgeted call, on a bare GPU machine (torch preinstalled, no network):
#
#   benchmarks/gpu_check.sh OUTDIR [BUDGET_SECONDS=540] [--dry-run] [--skip-build] [--steps a,b,...]
#
# builds the CUDA kernels in place, checks they are there, runs a smoke pass per op family, the CUDA tests with
# compute-sanitizer beside them, and the quick benchmarks; every step under a deadline from the budget, each
# result written to OUTDIR as it finishes (summary.json, results.json, logs). The steps live in gpu_check.py;
# benchmarks/README.md describes them. PYTHON picks the interpreter (default: python3, the one with torch).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-python3}"
if ! command -v "$python_bin" >/dev/null 2>&1; then
  echo "gpu_check.sh: no Python interpreter '$python_bin' (set PYTHON)" >&2
  exit 2
fi
exec "$python_bin" "$here/gpu_check.py" "$@"
