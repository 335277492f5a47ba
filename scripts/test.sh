#!/usr/bin/env bash
# The tests, as CI runs them (after scripts/setup.sh): the whole suite, and the triton backend's tests under the
# interpreter (its own file, and its cases of the plan-mutation, flat-buffer, checkpoint and Tensor hyperparameter
# parity tables). The interpreter runs need processes of their own (TRITON_INTERPRET=1 must be set before triton is
# first imported) and are single-threaded Python, so they run beside the main suite, on the other core. Exits
# non-zero when any run fails, pytest's exit code 5 (no test ran) included; the interpreter runs' output is printed
# after the main suite's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

log=$(mktemp)
trap 'rm -f "$log"' EXIT
(
    export TRITON_INTERPRET=1
    "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py &&
        "$PY" -m pytest -q -p no:cacheprovider -k triton tests/test_plan_mutations.py tests/test_flat.py tests/test_checkpoint.py &&
        "$PY" -m pytest -q -p no:cacheprovider -k "triton and tensor_hyper" tests/test_parity.py
) >"$log" 2>&1 &
interpreted=$!

"$PY" -m pytest -q tests
main=$?
wait "$interpreted"
triton=$?

echo
echo "== the triton backend under TRITON_INTERPRET=1 =="
cat "$log"
echo "== exit codes: main suite $main, triton under the interpreter $triton =="
[ "$main" -eq 0 ] && [ "$triton" -eq 0 ]
