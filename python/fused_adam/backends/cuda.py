"""CUDA backend: the multi-tensor kernel of csrc/cuda (extension module fused_adam._C_cuda).

prepare() makes the partition's native object (_C_cuda.Partition): its tensor and chunk tables in device memory,
built once and kept across steps (NOTE [device table] in csrc/cuda/device_table.h). A step checks the tensors in
C++, patches the table entries whose buffers moved (a grad allocated anew) with one small stream-ordered copy, and
runs one launch of persistent blocks over every chunk of the partition, 128-bit accesses wherever a chunk's buffers
are aligned; the per-element math is csrc/adam_math.h, shared with the CPU kernel. Non-capturable steps (CPU step
tensors) get their bias corrections from the host; capturable steps read step and lr on the device, so step() can
be captured in a CUDA graph.

All the optional features (backends/__init__.py): fp32 master weights, states in their own dtype (float32 params
with bfloat16 states, bfloat16/float16 params with float32 states), stochastic rounding (salts from the step, on the
device), and clipping by a coefficient the kernel reads on the device. Which dtype pairs and options have kernels is
decided in C++ (csrc/cuda/adam_cuda.h, unsupported), asked through the binding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import Amp, Backend, Hyper, PartOptions

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


def _import_native() -> tuple[Any, BaseException | None]:
    try:
        from .. import _C_cuda  # type: ignore[attr-defined]
    except Exception as e:  # not built here (no CUDA torch or no nvcc), or a broken build
        return None, e
    return _C_cuda, None


class CudaBackend(Backend):
    """`native` is the binding (fused_adam._C_cuda): Partition(...) and unsupported(param, state, master). The CPU
    emulation of tests/test_cuda_build.py passes its own, on `device_type` "cpu"."""

    name = "cuda"

    def __init__(self, native: Any = None, device_type: str = "cuda", chunk_size: int = 0):
        if native is None:
            native, self._import_error = _import_native()
        else:
            self._import_error = None
        self.native, self.device_type, self.chunk_size = native, device_type, chunk_size

    def unavailable(self) -> str | None:
        if self.device_type == "cuda" and torch.version.cuda is None:
            return f"torch {torch.__version__} is built without CUDA"
        if self.native is None:
            err = self._import_error
            return f"extension fused_adam._C_cuda is not built: {type(err).__name__}: {err}"
        return None

    def supports(self, part) -> str | None:
        if part.device.type != self.device_type:
            return f"runs on CUDA devices only, got {part.device}"
        return self.unsupported_options(part.options)

    def unsupported_options(self, o: PartOptions) -> str | None:
        """Why the kernels cannot run these options on any device, or None."""
        if o.differentiable:
            return "differentiable=True needs autograd through the step (the reference backend does it)"
        for what, dtype in (("dtype", o.param_dtype), ("state_dtype", o.state_dtype)):
            if dtype not in _DTYPE_NAMES:
                return f"{what} {dtype} is not supported (float32, float64, bfloat16, float16)"
        return self.native.unsupported(_DTYPE_NAMES[o.param_dtype], _DTYPE_NAMES[o.state_dtype], o.master) or None

    def prepare(self, part) -> None:
        part.prepared = self.native.Partition(
            part.params, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps,
            master_params=part.master_params, tensor_ids=part.tensor_ids, options=part.options,
            chunk_size=self.chunk_size,
        )

    def step(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp, checked: bool = False) -> bool:
        # (checked: the pass runs again, on host memory that the launches in between left in cache)
        # The binding reads hp and amp (csrc/common/py_options.h, read_step): Tensor hyperparameters on the host,
        # except a capturable step's lr on the params' device, which the kernel reads there.
        return part.prepared.step_(grads, hp, amp)

    def check(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp) -> bool:
        return part.prepared.check_(grads, hp, amp)


BACKEND = CudaBackend()
