"""CPU backend: the C++ kernel of fused_adam._C (csrc/cpu), one call per (cpu, dtype) partition.

prepare() converts the partition's lists and options to C++ once (_C.Partition, kept in part.prepared). A step
hands it the grads (or None: the kernel reads each param's .grad itself, NOTE [grads read in C++] in csrc/ops.cpp)
with the step's Hyper and Amp; the kernel checks every tensor, increments every step, computes each tensor's bias
corrections from its own step and runs a SIMD loop (AVX-512 with AVX512_BF16 / AVX-512 / AVX2 picked at run time)
over a chunk table spanning all the partition's tensors, with threads splitting the work across tensors.

It implements every optional feature of backends/__init__.py (NOTE [cpu feature loops] in csrc/cpu/kernel.h): the
kernel is instantiated for the storage combinations that are useful (fp32 params with bf16 states, bf16/fp16 params
with fp32 states or an fp32 master, ...) and supports() declines the others with the kernel's reason, so that auto
falls back to the reference backend.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import Amp, Backend, Hyper

if TYPE_CHECKING:
    from ..plan import Partition

try:
    from .. import _C
except Exception as e:  # the package imports without its native part; auto then falls back to reference
    _C = None
    _IMPORT_ERROR: str | None = (f"fused_adam._C could not be imported ({type(e).__name__}: {e}); "
                                 "build it with `pip install --no-build-isolation -e .`")
else:
    _IMPORT_ERROR = None

# The dtypes the kernel stores (csrc/common/dtype.h); which (param, state) combinations it has is the kernel's own
# answer (_C.cpu_unsupported).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _combination(param_dtype: torch.dtype, state_dtype: torch.dtype, master: bool, sr_param: bool,
                 sr_state: bool) -> str | None:
    return _C.cpu_unsupported(str(param_dtype), str(state_dtype), master, sr_param, sr_state)


class CpuBackend(Backend):
    name = "cpu"

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def supports(self, part: Partition) -> str | None:
        o = part.options
        if part.device.type != "cpu":
            return f"the cpu backend runs on cpu tensors only, not {part.device.type}"
        if o.differentiable:
            return "differentiable=True needs autograd through the step, which only the reference backend keeps"
        for what, dtype in (("dtype", o.param_dtype), ("state_dtype", o.state_dtype)):
            if dtype not in KERNEL_DTYPES:
                return f"{what} {dtype} is not supported by the cpu kernel (float32, float64, bfloat16, float16 are)"
        return _combination(o.param_dtype, o.state_dtype, o.master, o.sr_param, o.sr_state)

    def prepare(self, part: Partition) -> None:
        part.prepared = _C.Partition(
            part.params, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps,
            master_params=part.master_params, tensor_ids=part.tensor_ids, options=part.options,
        )

    def step(self, part: Partition, grads: list[Tensor] | None, hp: Hyper, amp: Amp, checked: bool = False) -> bool:
        if part.prepared is None:
            self.prepare(part)
        return part.prepared.step_(grads, hp, amp, checked=checked)  # checked: no second pass (csrc/ops.cpp)

    def check(self, part: Partition, grads: list[Tensor] | None, hp: Hyper, amp: Amp) -> bool:
        if part.prepared is None:
            self.prepare(part)
        return part.prepared.check_(grads, hp, amp)


BACKEND = CpuBackend()
