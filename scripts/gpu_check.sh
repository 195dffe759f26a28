#!/usr/bin/env bash
# One GPU check of varcore (card, build for this card, CUDA tests, attention and sampler benchmarks) in one JSON;
# see scripts/gpu_check.py for the steps and docs/benchmarks.md ("The GPU check"). Run from anywhere:
#
#   bash scripts/gpu_check.sh [OUT.json] [--skip-build] [--budget-s 480] [--dry-run]
#
# Environment: PYTHON, the interpreter with torch (default: python). Exit status 1 when a step failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=gpu_check.json
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option names the output
  OUT=$1
  shift
fi
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" --out "$OUT" "$@"
