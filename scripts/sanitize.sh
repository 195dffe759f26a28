#!/usr/bin/env bash
# Memory-safety check: build the CPU kernels (varcore._C, without CUDA) and the emulated CUDA kernels
# (varcore._simt) with AddressSanitizer + UndefinedBehaviorSanitizer into a separate directory, then run the op
# tests against that build. Any out-of-bounds access, use-after-free or undefined behaviour aborts the run.
#
#   scripts/sanitize.sh [extra pytest args]     (e.g. -m "slow and not cuda" for the 500-case fuzz runs)
#
# Environment:
#   SANITIZE_DIR   where the copy is built (default: $TMPDIR/varcore-sanitize); the in-tree build is not touched
#   PYTHON         the interpreter with torch, pytest and hypothesis (default: python3)
#   SANITIZE_TESTS the test files to run (default: the op test files)
#   MAX_JOBS       parallel compile jobs (default 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DIR=${SANITIZE_DIR:-${TMPDIR:-/tmp}/varcore-sanitize}
TESTS=${SANITIZE_TESTS:-"tests/ops/test_par_order.py tests/ops/test_attention.py tests/ops/test_quant.py tests/ops/test_simt.py tests/ops/test_fuzz_ops.py tests/test_bad_inputs.py tests/ops/test_linear.py"}
export MAX_JOBS=${MAX_JOBS:-2}
t0=$(date +%s)
stamp() { echo "$(( $(date +%s) - t0 ))s"; }

echo "=== [$(stamp)] copying sources to $DIR"
mkdir -p "$DIR/src"
# sources only (no compiled modules); the copy keeps its own build/ between runs, so a rerun is incremental
(cd "$ROOT" && tar cf - --exclude='*.so' --exclude='__pycache__' setup.py pyproject.toml csrc varcore tests) \
  | (cd "$DIR/src" && tar xf -)

echo "=== [$(stamp)] building with -fsanitize=address,undefined (CPU kernels + emulated CUDA kernels)"
(cd "$DIR/src" && VARCORE_SANITIZE=address,undefined VARCORE_CUDA=0 VARCORE_SIMT=1 \
  "$PYTHON" setup.py -q build_ext --inplace > "$DIR/build.log" 2>&1) || {
  grep -E "error" "$DIR/build.log" | head -40; echo "build failed; log: $DIR/build.log"; exit 1; }

# Python itself is not instrumented: the sanitizer runtimes must be loaded first.
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# leaks: CPython and torch keep allocations until exit by design; the fibers switch stacks (annotated in simt).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONPATH="$DIR/src"
export VARCORE_REQUIRE_SIMT=1
export VARCORE_GOLDEN=${VARCORE_GOLDEN:-$ROOT/tests/golden}

cd "$DIR/src"
"$PYTHON" - <<PY
import varcore
assert varcore.__file__.startswith("$DIR/src"), varcore.__file__
r = varcore.info(print_report=False)
assert r["compiled"]["cpu"] and r["compiled"]["emulation"] == "built", r["compiled"]
print("sanitized build loaded from", varcore.__file__)
PY
echo "=== [$(stamp)] op tests under ASan + UBSan"
# shellcheck disable=SC2086
"$PYTHON" -m pytest $TESTS -m "not cuda and not slow" -q -p no:cacheprovider "$@"
echo "=== [$(stamp)] sanitizer run clean"
