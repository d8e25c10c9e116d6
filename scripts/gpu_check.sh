#!/usr/bin/env bash
# GPU checks for a machine with a CUDA GPU and a CUDA build of torch already installed (no .venv):
# builds the extension in place against that torch, then runs the cuda-marked tests, the Triton
# tests on the GPU, compute-sanitizer on a few kernels, and the kernel benchmarks.
#   OUT=/tmp/gpu scripts/gpu_check.sh [quick|dispatch|speed|next]
# quick: only the cuda-marked tests. dispatch: after the build, only the dispatch checks, in about
# 9 minutes on an H200 (build included): the cuda-marked tests of tests/test_dispatch_cuda.py,
# `python -m skiplayers.dispatch.tune --out $OUT/dispatch_table.json` (each only if its file
# exists), then benchmarks/e2e_gpu.py with --budget-s set to what is left of DISPATCH_TOTAL_S
# (default 540 s) minus a margin for its last case; its results are copied to $OUT.
# speed: after the build, the figures of issue 8 in about 9 minutes (SPEED_TOTAL_S, default 540,
# build included): benchmarks/bench_kernels.py --quick --dtype bfloat16 (every output checked against the reference
# before it is timed) with about half of what is left, then benchmarks/e2e_gpu.py (decode eager and
# under CUDA graphs) with the rest; results copied to $OUT.
# next: after the build, the CUDA backend's next kernel generation (csrc/cuda/kernel_generation.h,
# SKIPLAYERS_CUDA_KERNELS=next): its op tests, model tests and sanitizer runs, then
# benchmarks/bench_kernels.py --quick --dtype bfloat16 with the stable and next CUDA columns side by
# side, within NEXT_TOTAL_S (default 540, build included).
# Logs go to $OUT; the last lines printed are a summary. Exits non-zero when any step failed, or when
# a sanitizer's marker (tests/sanitized.py) selects no test.
set -uo pipefail
cd "$(dirname "$0")/.."
begin=$(date +%s)
MODE="${1:-}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# Build host code with the system compiler whose libstdc++ the process loads. (On the lent GPU
# image, CC points to /opt/gcc, a different gcc: torch passes it to nvcc as -ccbin, and host code of
# the .cu files then formats error messages with another libstdc++'s templates and crashes.)
export CC="${GPU_CHECK_CC:-/usr/bin/gcc}" CXX="${GPU_CHECK_CXX:-/usr/bin/g++}"
summary=()

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# The CUTLASS / CuTe headers (requirements-build.txt) for the sm_90a prefill. The GPU machine has no
# package registry: carry the pinned wheel in wheels/ (on a machine with one:
# `pip download --no-deps -r requirements-build.txt -d wheels`); its include directory is unpacked
# into $OUT and named by SKIPLAYERS_CUTLASS_INCLUDE (setup.py), so nothing is installed.
if [ -z "${SKIPLAYERS_CUTLASS_INCLUDE:-}" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
  whl=$(ls wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    echo "BUILD FAILED: no CUTLASS headers (no cutlass_library installed, no wheels/nvidia_cutlass-*.whl carried)"; exit 1
  fi
  "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" "$whl" "$OUT/cutlass"
  export SKIPLAYERS_CUTLASS_INCLUDE="$OUT/cutlass/cutlass_library/source/include"
fi

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -40
  echo "BUILD FAILED (see build.log)"; exit 1
fi
summary+=("build: $(( $(date +%s) - start )) s")

run() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && failed=1
  summary+=("$name: rc=$rc, $(( $(date +%s) - t0 )) s, $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/$name.log" | tail -1)")
}

failed=0
SANITIZE_FILES="tests/test_ops.py"
sanitize() {  # tool: the cuda cases marked for it, under compute-sanitizer; fails on an empty selection
  local tool=$1 selected
  selected=$("$PY" -m pytest --collect-only -q -m "cuda and $tool" $SANITIZE_FILES 2>/dev/null | grep -c "::")
  if [ "${selected:-0}" -eq 0 ]; then
    summary+=("sanitizer_$tool: FAILED, the marker selects no test"); failed=1; return
  fi
  run "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -x -m "cuda and $tool" \
    $SANITIZE_FILES
  summary+=("sanitizer_$tool: $selected cases selected")
}

if [ "$MODE" = "dispatch" ]; then
  if [ -f tests/test_dispatch_cuda.py ]; then run dispatch_tests "$PY" -m pytest -q -rs -m cuda tests/test_dispatch_cuda.py; fi
  if [ -f skiplayers/dispatch/tune.py ]; then
    run dispatch_tune "$PY" -m skiplayers.dispatch.tune --out "$OUT/dispatch_table.json"
    # The end-to-end run dispatches by the table just measured (ship it as
    # skiplayers/dispatch/tables/<device>.json: the "device" field of the file names it).
    [ -f "$OUT/dispatch_table.json" ] && export SKIPLAYERS_DISPATCH_TABLE="$OUT/dispatch_table.json"
  fi
  # What is left of the mode's time, less a margin: e2e_gpu.py checks its budget between cases, so
  # the last case it starts (up to a minute for Llama-3-8B, B=8, 16k context) runs past it.
  budget=$(( ${DISPATCH_TOTAL_S:-540} - ($(date +%s) - begin) - 75 ))
  [ "$budget" -lt 60 ] && budget=60
  run e2e_gpu "$PY" benchmarks/e2e_gpu.py --out "$OUT" --budget-s "$budget"
  summary+=("e2e_gpu: budget ${budget} s; $(grep -E '^elapsed' "$OUT/e2e_gpu.log" | tail -1)")
  cp benchmarks/results/e2e_gpu.* "$OUT/" 2>/dev/null
  printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
  exit "$failed"
fi

if [ "$MODE" = "speed" ]; then
  left=$(( ${SPEED_TOTAL_S:-540} - ($(date +%s) - begin) ))
  run bench_kernels "$PY" benchmarks/bench_kernels.py --quick --dtype bfloat16 --budget-s $(( left / 2 - 30 ))
  cp benchmarks/results/kernels.* "$OUT/" 2>/dev/null
  budget=$(( ${SPEED_TOTAL_S:-540} - ($(date +%s) - begin) - 75 ))  # margin: the last case runs past it
  [ "$budget" -lt 60 ] && budget=60
  run e2e_gpu "$PY" benchmarks/e2e_gpu.py --out "$OUT" --budget-s "$budget"
  cp benchmarks/results/e2e_gpu.* "$OUT/" 2>/dev/null
  printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
  exit "$failed"
fi

CUDA_OP_FILES="tests/test_ops.py tests/test_cuda_graphs_and_asserts.py"
if [ "$MODE" = "next" ]; then
  export SKIPLAYERS_CUDA_KERNELS=next  # the op tests and the model tests run the next generation
  run next_op_tests "$PY" -m pytest -q -rs -m "cuda and not slow" $CUDA_OP_FILES tests/test_cuda_generation.py
  run next_model_tests "$PY" -m pytest -q -rs -m "cuda and not slow" tests/test_model_cuda.py tests/test_static_decode.py
  for tool in memcheck racecheck; do
    sanitize "$tool"
  done
  unset SKIPLAYERS_CUDA_KERNELS  # the benchmark sets it per column (cuda: stable, cuda_next: next)
  left=$(( ${NEXT_TOTAL_S:-540} - ($(date +%s) - begin) - 30 ))
  [ "$left" -lt 60 ] && left=60
  run bench_kernels "$PY" benchmarks/bench_kernels.py --quick --dtype bfloat16 --budget-s "$left"
  cp benchmarks/results/kernels.* "$OUT/" 2>/dev/null
  printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
  exit "$failed"
fi
run cuda_op_tests "$PY" -m pytest -q -rs -m "cuda and not slow" $CUDA_OP_FILES -k "not rejects and not device_side"
run cuda_error_tests "$PY" -m pytest -q -rs -m "cuda and not slow" $CUDA_OP_FILES -k "rejects or device_side"
# test_static_decode: the paged decode step captured in a CUDA graph and replayed.
run cuda_model_tests "$PY" -m pytest -q -rs -m "cuda and not slow" tests/test_model_cuda.py tests/test_skipping.py \
  tests/test_static_decode.py
if [ "$MODE" != "quick" ]; then
  # With a GPU visible, the Triton tests run compiled on CUDA tensors instead of the interpreter.
  run triton_gpu_tests "$PY" -m pytest -q -rs -m triton tests/test_ops.py tests/test_triton_kernels.py \
    tests/test_triton_registration.py tests/test_model_triton.py
  # compute-sanitizer runs the cases marked for its tool (tests/sanitized.py: memcheck, the paged
  # reads and writes of decode over shuffled pages of sizes 1 / 16 / 64, append, in-place compaction,
  # and ragged prefill; racecheck, the shared-memory hazards of the decode kernel's lane-group merge,
  # cache_compact's window move list and the GQA prefill tiles). An empty selection fails the check.
  for tool in memcheck racecheck; do
    sanitize "$tool"
  done
  run bench_kernels "$PY" benchmarks/bench_kernels.py --quick --budget-s "${BENCH_BUDGET_S:-300}"
  cp benchmarks/results/kernels.* "$OUT/" 2>/dev/null
fi
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit "$failed"
