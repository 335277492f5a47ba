"""The extensions link the shared C++ runtime that torch's libraries use (setup.py, CXX_RUNTIME_LINK_ARGS).

On the lent GPU machines CXX=/opt/gcc/bin/g++ ships only libstdc++.a, so an extension built there got its own copy
of iostream and locale: the first number formatted into a TORCH_CHECK message crashed the process (SIGSEGV in
std::ostream::_M_insert<unsigned long>, from fused_adam._C_cuda and fused_adam._C alike; bench/NOTES.md, "GPU
machine"). Here `-static-libstdc++` makes the same static copy, and the message is cut at its first number.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_native
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
linux_gxx = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None or shutil.which("readelf") is None,
    reason="needs Linux, g++ and readelf",
)


def _setup_link_args() -> list[str]:
    spec = importlib.util.spec_from_file_location("fused_adam_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the constants; setup() runs only as __main__
    return module.CXX_RUNTIME_LINK_ARGS


def _needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(lib)], check=True, capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


# A number in a TORCH_CHECK message is formatted by std::ostream inside the library that raises.
SOURCE = r"""
#include <c10/util/Exception.h>
#include <cstdint>
#include <cstring>
extern "C" void format_error(char* out, size_t n) {
  out[0] = 0;
  try {
    TORCH_CHECK(false, "grads[", size_t(1), "] has ", int64_t(5), " elements");
  } catch (const c10::Error& e) {
    std::strncpy(out, e.what_without_backtrace(), n - 1);
    out[n - 1] = 0;
  }
}
"""
EXPECTED = "grads[1] has 5 elements"


def _build_and_format(tmp_path: Path, name: str, link_args: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    """Build SOURCE as a shared library with a static libstdc++ requested, then call it in a child process (a
    crash must not take pytest down). Skips where this toolchain has no static libstdc++ to link."""
    src, lib = tmp_path / "fmt.cpp", tmp_path / f"{name}.so"
    src.write_text(SOURCE)
    torch_lib = Path(cpp_extension.library_paths()[0])
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", abi, *(f"-I{p}" for p in cpp_extension.include_paths()),
           str(src), f"-L{torch_lib}", "-lc10", *link_args, "-static-libstdc++", "-o", str(lib)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"this g++ cannot link a static libstdc++ into a shared library: {build.stderr[-300:]}")
    call = (f"import ctypes, torch; lib = ctypes.CDLL({str(lib)!r}); buf = ctypes.create_string_buffer(256); "
            "lib.format_error(buf, 256); print(buf.value.decode())")
    return lib, subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=120)


@linux_gxx
def test_static_runtime_request_still_links_the_shared_one(tmp_path):
    args = _setup_link_args()
    assert args == ["-l:libstdc++.so.6"]
    lib, run = _build_and_format(tmp_path, "with_setup_args", args)
    assert "libstdc++.so.6" in _needed(lib)
    assert run.returncode == 0 and run.stdout.strip() == EXPECTED, (run.returncode, run.stdout, run.stderr[-2000:])
    # Without setup.py's arguments the same build has the static copy, and the message breaks (cut short here,
    # a crash on the GPU machine): what the arguments above prevent.
    lib, run = _build_and_format(tmp_path, "without", [])
    assert "libstdc++.so.6" not in _needed(lib)
    assert run.returncode != 0 or run.stdout.strip() != EXPECTED, run.stdout


@linux_gxx
@requires_native
def test_built_extensions_use_the_shared_runtime():
    import fused_adam

    libs = sorted(Path(fused_adam.__file__).parent.glob("_C*.so"))
    assert libs
    for lib in libs:
        assert "libstdc++.so.6" in _needed(lib), lib
