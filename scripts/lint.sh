#!/usr/bin/env bash
# The static checks, with the settings of pyproject.toml ([tool.ruff], [tool.mypy]):
#   ruff check .   the whole tree (pyflakes, pycodestyle, import order, bugbear, pyupgrade)
#   mypy           the package: skiplayers/ and triton_kernels/
# Both always run; the script fails if either reports a violation. `scripts/run.sh lint` sets up .venv
# first (ruff and mypy are pinned in requirements.txt); here $PYTHON or .venv's python is used.
# Fixes: `ruff check --fix .` for what ruff can fix itself (it never reformats: no `ruff format`).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "lint.sh: no $PY; run scripts/run.sh lint (it sets up .venv) or set PYTHON" >&2; exit 2; }

summary=()
failed=0
check() {  # check NAME COMMAND...: runs it, timed, and records the outcome
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== $name: $*"
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then summary+=("$name: ok ($((SECONDS - start)) s)")
  else summary+=("$name: FAILED, exit $rc ($((SECONDS - start)) s)"); failed=1; fi
}

check ruff "$PY" -m ruff check .
check mypy "$PY" -m mypy

echo "== lint summary"
printf '   %s\n' "${summary[@]}"
exit "$failed"
