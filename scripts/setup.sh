#!/usr/bin/env bash
# Sets up .venv with everything the package, its tests and its benchmarks need, and builds the native
# extension. Idempotent: a second run installs nothing new and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# torch is pinned in every install step: on a CPU machine 2.13.0 is a CPU build (from local disk where one
# is kept); an unpinned torch, asked for directly or by another package, would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" torch==2.13.0 -r requirements-dev.txt
# --no-build-isolation: build against the torch just installed, never a fresh one in an isolated env.
"${PIP[@]}" torch==2.13.0 --no-build-isolation -e .

.venv/bin/python - <<'PY'
import fused_adam
from fused_adam import backends
print("fused_adam", fused_adam.__version__, "backends:",
      {n: backends.unavailable(n) or "available" for n in backends.BACKEND_NAMES})
PY
