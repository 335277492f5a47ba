"""Skips come from here, each with its reason, and so do the shared fixtures."""
from __future__ import annotations

import os

import pytest
import torch

from fused_adam import backends


def _reason(name: str) -> str | None:
    return backends.unavailable(name)


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton not importable: {e}"
    return None


requires_native = pytest.mark.skipif(_reason("cpu") is not None, reason=f"cpu backend unavailable: {_reason('cpu')}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
requires_triton = pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason()))
requires_triton_interpreter = pytest.mark.skipif(
    _triton_reason() is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (Triton kernels on CPU tensors)",
)
requires_nvcc = pytest.mark.skipif(
    __import__("shutil").which("nvcc") is None, reason="nvcc not on PATH"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long convergence or benchmark-like runs (run with -m slow)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
