#!/usr/bin/env bash
# The CPU extension under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh                      build, self-test, run the CPU op / model / fuzz tests
#   SANITIZE_PYTEST_ARGS="-k anchors -x" scripts/sanitize.sh     extra pytest arguments
#   SANITIZE_TESTS="tests/test_ops.py" scripts/sanitize.sh       other test files (default below)
#   SANITIZE_K="" scripts/sanitize.sh        the -k filter (default "not torch": the pure-PyTorch
#                                            backend runs no code of ours built with sanitizers)
#
# 1. Builds skiplayers._C CPU-only with -fsanitize=address,undefined -fno-sanitize-recover=all -O1 -g
#    (setup.py, SKIPLAYERS_SANITIZE=1) out of tree, in build/sanitize/; the normal
#    skiplayers/_C*.so is never touched. Ninja rebuilds only what changed.
# 2. Stages a package build/sanitize/stage/skiplayers: symlinks to the checkout's Python sources plus
#    the sanitized _C, with triton_kernels/, tests/, csrc/ and pyproject.toml (the pytest settings)
#    linked beside it, so that every path derived from a file's location (skiplayers/_source_tree.py,
#    the fuzz workers, which put their repository root first on PYTHONPATH) lands in the stage. Tests
#    run from the stage, it is first on PYTHONPATH, and Python runs with -P; a pytest plugin
#    (scripts/sanitize/plugin.py) refuses to run unless the sanitized _C and the ASan runtime are the
#    ones loaded.
# 3. Self-test: planted bugs (scripts/sanitize/selftest.cpp: heap overflow, use after free, signed
#    overflow, null read) compiled with the same flags and called from Python under the same
#    preload and options must each abort with a report; otherwise the set-up is broken.
# 4. Runs the tests under LD_PRELOAD of libasan + libubsan (Python itself is not instrumented, so
#    the runtimes must be loaded first) and fails on any report: ASan aborts on its first error,
#    UBSan aborts too (-fno-sanitize-recover=all, halt_on_error=1), and the output is scanned for
#    report markers as a second line of defence.
#
# Reuses the .venv of scripts/run.sh (run `scripts/run.sh test` once first), or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
START=$(date +%s)

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "sanitize.sh: no $PY; run scripts/run.sh test first (it sets up .venv) or set PYTHON" >&2; exit 2; }
export MAX_JOBS="${MAX_JOBS:-2}"
OUT="$ROOT/build/sanitize"
STAGE="$OUT/stage"
mkdir -p "$OUT"

# Default: the CPU op tests, the CPU model tests, and the fuzz suite (whatever of it exists).
if [ -z "${SANITIZE_TESTS:-}" ]; then
  SANITIZE_TESTS="tests/test_ops.py tests/test_model_cpu.py"
  [ -d tests/fuzz ] && SANITIZE_TESTS+=" tests/fuzz"
  for f in tests/test_fuzz*.py; do [ -e "$f" ] && SANITIZE_TESTS+=" $f"; done
fi

# The fuzz suite under sanitizers looks for memory errors, not for rare numerical cases (the normal
# test run fuzzes with its full budget): a smaller default budget keeps this run short.
export SKIPLAYERS_FUZZ_EXAMPLES="${SKIPLAYERS_FUZZ_EXAMPLES:-600}"

step() { echo "== [$(( $(date +%s) - START ))s] $*"; }

step "building the sanitized CPU extension in build/sanitize/ (MAX_JOBS=$MAX_JOBS)"
SKIPLAYERS_SANITIZE=1 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; echo "sanitize.sh: build failed (log: $OUT/build.log)" >&2; exit 1; }
SO=$(ls "$OUT"/lib/skiplayers/_C*.so)

step "staging build/sanitize/stage (sources linked, sanitized _C)"
# A mirror of the checkout whose skiplayers/ holds the sanitized _C: code that derives the repository
# root from its own path (tests, the fuzz workers that put that root first on PYTHONPATH,
# skiplayers/_source_tree.py) finds the stage, never the checkout's normal extension.
rm -rf "$STAGE"
mkdir -p "$STAGE/skiplayers"
for f in "$ROOT"/skiplayers/*.py; do ln -s "$f" "$STAGE/skiplayers/"; done
for d in "$ROOT"/skiplayers/*/; do d="${d%/}"; [ "$(basename "$d")" = __pycache__ ] || ln -s "$d" "$STAGE/skiplayers/"; done
ln -s "$SO" "$STAGE/skiplayers/"
for p in triton_kernels tests csrc pyproject.toml; do ln -s "$ROOT/$p" "$STAGE/$p"; done
ln -s "$ROOT/scripts/sanitize/plugin.py" "$STAGE/_sanitize_plugin.py"

# --- the sanitizer environment --------------------------------------------------------------
ASAN_RT=$(gcc -print-file-name=libasan.so)
UBSAN_RT=$(gcc -print-file-name=libubsan.so)
[ -e "$ASAN_RT" ] && [ -e "$UBSAN_RT" ] || { echo "sanitize.sh: gcc has no libasan/libubsan" >&2; exit 2; }
# Only the sanitized processes get the preload (the compilers and grep run without it).
PRELOAD="$ASAN_RT:$UBSAN_RT"
sanitized() { LD_PRELOAD="$PRELOAD" "$@"; }
# detect_leaks=0: CPython and torch keep allocations alive until exit by design (interned objects,
#   the dispatcher's registries, thread pools); LeakSanitizer would report those at exit.
# exitcode=86: ASan's exit status on a report (default 1, which pytest also uses for failures).
# Everything else stays at its default: halt on the first error, ODR-violation checks on (only our
#   library is instrumented, and it reports none), shadow gap protected (no CUDA is initialised on a
#   machine without a GPU; on a GPU machine CUDA's driver may need protect_shadow_gap=0, which
#   SANITIZE_ASAN_OPTIONS can add: untested here).
export ASAN_OPTIONS="detect_leaks=0:exitcode=86:${SANITIZE_ASAN_OPTIONS:-}"
# print_stacktrace: say where; halt_on_error: stop at the first (with -fno-sanitize-recover=all the
#   library aborts anyway); exitcode=87 tells a UBSan abort apart.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export SKIPLAYERS_SANITIZED_SO="$SO"

REPORT_MARKERS='ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer'

SAN_FLAGS=(-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)

step "self-test: planted bugs must be reported"
g++ -shared -fPIC "${SAN_FLAGS[@]}" scripts/sanitize/selftest.cpp -o "$OUT/libselftest.so"
for fn in heap_overflow use_after_free signed_overflow null_read; do
  log="$OUT/selftest_$fn.log"
  if sanitized "$PY" -P -c "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.$fn(1); print('returned normally')" \
       "$OUT/libselftest.so" > "$log" 2>&1; then
    cat "$log"; echo "sanitize.sh: self-test $fn was NOT caught: the sanitizer set-up is broken" >&2; exit 1
  fi
  grep -Eq "$REPORT_MARKERS" "$log" || { cat "$log"; echo "sanitize.sh: self-test $fn failed without a report" >&2; exit 1; }
  echo "   $fn: caught ($(grep -Eo -m1 'AddressSanitizer: [A-Za-z-]+|runtime error: [a-z ]+' "$log"))"
done

step "preflight: the sanitized extension is the one Python imports"
(cd "$STAGE" && sanitized "$PY" -P -c "import skiplayers._C as c, os, sys; p = os.path.realpath(c.__file__); print('   skiplayers._C =', p); sys.exit(p != os.path.realpath(sys.argv[1]))" "$SO")

step "tests/cpp/index_math_test.cpp (torch-free index math) built and run with the same sanitizers"
g++ -std=c++17 -Wall -Werror "${SAN_FLAGS[@]}" -I csrc/include tests/cpp/index_math_test.cpp -o "$OUT/index_math_test"
"$OUT/index_math_test" > "$OUT/index_math_test.log" 2>&1 || { cat "$OUT/index_math_test.log"; echo "sanitize.sh: index_math_test failed" >&2; exit 1; }
! grep -Eq "$REPORT_MARKERS" "$OUT/index_math_test.log" || { cat "$OUT/index_math_test.log"; exit 1; }
echo "   passed, no report"

SANITIZE_K="${SANITIZE_K-not torch}"
K_FILTER=()
[ -n "$SANITIZE_K" ] && K_FILTER=(-k "$SANITIZE_K")
step "pytest under ASan+UBSan: $SANITIZE_TESTS ${K_FILTER[*]:-} ${SANITIZE_PYTEST_ARGS:-}"
LOG="$OUT/pytest.log"
cd "$STAGE"   # test paths are relative to the repository root, which the stage mirrors
set +e
# --capture=sys: pytest must not capture fd 2, or a report printed just before the abort is lost
#   with the capture file. -p no:faulthandler: Python's SIGSEGV handler would run before ASan's and
#   garble its report.
# shellcheck disable=SC2086
sanitized "$PY" -P -m pytest -p _sanitize_plugin -p no:faulthandler -p no:cacheprovider --capture=sys \
  -q -rs -m "not cuda and not triton" ${K_FILTER[@]+"${K_FILTER[@]}"} \
  $SANITIZE_TESTS ${SANITIZE_PYTEST_ARGS:-} 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
set -e
ELAPSED=$(( $(date +%s) - START ))
if grep -Eq "$REPORT_MARKERS" "$LOG"; then
  echo "sanitize.sh: FAILED: sanitizer report(s) above (log: $LOG); ${ELAPSED}s" >&2
  exit 1
fi
if [ "$RC" -ne 0 ]; then
  echo "sanitize.sh: FAILED: pytest exited $RC (86: ASan report, 87: UBSan report, else a test failure; log: $LOG); ${ELAPSED}s" >&2
  exit 1
fi
echo "sanitize.sh: clean: no ASan/UBSan report, tests passed; ${ELAPSED}s in all"
