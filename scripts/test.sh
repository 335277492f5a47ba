#!/usr/bin/env bash
# Runs the whole test suite; exits non-zero if any run fails or runs no test (pytest's exit code 5).
# Triton tests run in their own pytest process because TRITON_INTERPRET=1 must be set before triton loads.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
status=0

run() {
  "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "FAILED (exit $rc): $*"
    status=1
  fi
}

run "$PY" -m pytest -q tests "$@"
run env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/test_triton_backend.py "$@"
exit $status
