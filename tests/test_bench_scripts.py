"""bench/gpu_step.py has no GPU to run on here: its --dry-run (CPU tensors, the Triton interpreter, tiny sizes)
and --profile modes run end to end in a process of their own (TRITON_INTERPRET=1 must precede triton's import)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_triton

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "python")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--dry-run", "--no-progress", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@requires_triton
def test_gpu_step_dry_run_writes_every_scenario(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step_dry_run.json").read_text())
    rows = {(r["scenario"], r["contender"]): r for r in result["rows"]}
    assert {s["name"] for s in result["scenarios"]} == {r[0] for r in rows}
    for (scenario, contender), row in rows.items():
        if contender in ("fused_adam triton", "torch fused", "copy roofline"):
            assert row["status"] == "ok" and row["median_ms"] > 0, (scenario, contender, row)
    assert (tmp_path / "gpu_step_dry_run.png").stat().st_size > 0


@requires_triton
@pytest.mark.parametrize("scenario, status", [("bf16", 0), ("no such scenario", 2)])
def test_gpu_step_profile_mode(scenario, status):
    proc = _run("--profile", scenario)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    if status == 0:
        assert "profiled bf16 50 mixed 1M: fused_adam triton" in proc.stdout
