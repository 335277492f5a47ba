"""Build: the CPU extension always, the CUDA extension only where torch has CUDA and nvcc exists.

FUSED_ADAM_SKIP_NATIVE=1 builds nothing native (the package then runs on the reference/triton backends);
FUSED_ADAM_SKIP_CUDA=1 skips only the CUDA extension. A failed native build is a warning, not a failed
install: the backend then reports itself unavailable with the reason.
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# Link the shared C++ runtime, the one torch's own libraries use, even where the compiler would link its static one
# (a toolchain that ships only libstdc++.a, as the lent GPU machines' CXX=/opt/gcc/bin/g++ does). A static copy puts
# a second iostream and locale inside the extension: a number formatted into a TORCH_CHECK message then cuts the
# message short or crashes the process (bench/NOTES.md, "GPU machine, second session"). Listed before the driver's
# own -lstdc++, the shared library defines every symbol first and nothing is pulled from the archive; elsewhere it
# is the same library.
CXX_RUNTIME_LINK_ARGS = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def native_extensions():
    if os.environ.get("FUSED_ADAM_SKIP_NATIVE") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # -fno-math-errno: without it gcc keeps sqrt scalar (3.5x slower). -ffp-contract=off: the math header's
    # order of operations is torch's; fma appears only where ATen uses one. C++20: torch 2.13's headers warn under 17.
    # -Wno-psabi: adam_update on a 64-byte SIMD type (csrc/cpu/bf16_avx512.h) takes it by value, and gcc notes
    # that GCC 4.6 changed how such arguments are passed; the call is always inlined (no #pragma silences a note).
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, pattern)))  # noqa: E731
    exts = [
        CppExtension(
            "fused_adam._C",
            rel("ops.cpp") + rel("cpu/*.cpp"),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp", *CXX_RUNTIME_LINK_ARGS],
            optional=True,
        )
    ]
    if os.environ.get("FUSED_ADAM_SKIP_CUDA") == "1":
        pass
    elif torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        warnings.warn("fused_adam: no CUDA torch or no nvcc; the cuda backend is not built")
    else:
        exts.append(
            CUDAExtension(
                "fused_adam._C_cuda",
                rel("cuda/*.cpp") + rel("cuda/*.cu"),
                include_dirs=[CSRC],
                # The binding in C++20, as the CPU extension (torch 2.13's headers warn under C++17). The .cu files
                # are torch-free: nvcc keeps torch's default.
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "--fmad=false"]},
                extra_link_args=CXX_RUNTIME_LINK_ARGS,
                optional=True,
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import CXX_RUNTIME_LINK_ARGS
    ext_modules, cmdclass = native_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
