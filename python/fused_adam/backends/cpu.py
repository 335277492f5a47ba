"""CPU backend: the C++ kernel of fused_adam._C (csrc/cpu), one call per (cpu, dtype) partition.

The kernel checks the tensors, increments every step, computes each tensor's bias corrections from its own step
and runs a SIMD loop (AVX-512 with AVX512_BF16 / AVX-512 / AVX2 picked at run time) over a chunk table spanning
all the partition's tensors, with threads splitting the work across tensors. This module turns Tensor
hyperparameters into host numbers and, given the optimizer's per-partition cache, hands the kernel the params,
states and steps converted once (_C.Partition): a step then converts only the grads.

It implements every optional feature of backends/__init__.py (NOTE [cpu feature loops] in csrc/cpu/kernel.h):
the kernel is instantiated for the storage combinations that are useful (fp32 params with bf16 states, bf16/fp16
params with fp32 states or an fp32 master, ...) and unsupported() declines the others with the kernel's reason,
so that auto falls back to the reference backend.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import Amp, Backend, Hyper

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C
except Exception as e:  # the package imports without its native part; auto then falls back to reference
    _C = None
    _IMPORT_ERROR: str | None = f"fused_adam._C could not be imported ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"
else:
    _IMPORT_ERROR = None


class CpuBackend(Backend):
    name = "cpu"

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def supports(self, part) -> str | None:
        o = part.options
        if part.device.type != "cpu":
            return f"the cpu backend runs on cpu tensors only, not {part.device.type}"
        if o.differentiable:
            return "differentiable=True needs autograd through the step, which only the reference backend keeps"
        if part.dtype not in SUPPORTED_DTYPES:
            return f"dtype {part.dtype} is not supported by the cpu kernel (float32, float64, bfloat16, float16 are)"
        if o.state_dtype != o.param_dtype or o.master or o.stochastic_rounding:
            return _unsupported_combination(part.dtype, o.state_dtype, o.master, o.stochastic_rounding)
        return None

    def prepare(self, part) -> None:
        lists = {}
        if part.options.master:
            lists["master_params"] = part.master_params
        if part.options.stochastic_rounding:
            lists["tensor_ids"] = part.tensor_ids
        part.prepared = _C.Partition(part.params, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs,
                                     part.state_steps, **lists)

    def step(self, part, grads, hp: Hyper, amp: Amp) -> bool:
        if not part.params:
            return True
        o = part.options
        extra = {}
        if o.stochastic_rounding:
            seed = o.seed & 0xFFFFFFFFFFFFFFFF
            extra.update(stochastic_rounding=True, seed=seed - (1 << 64) if seed >= 1 << 63 else seed)
        if amp.clip_coef is not None:
            extra["clip_coef"] = amp.clip_coef
        decay = None
        if isinstance(hp.lr, Tensor) and o.decoupled:
            # torch.optim.AdamW computes 1 - lr * wd in lr's dtype when lr is a Tensor; a double factor drifts from
            # it by more than fp64 parity allows over a few steps (torch's own fused path drifts twice as far).
            decay = (1 - hp.lr * hp.weight_decay).item()
        return part.prepared.step_(
            grads, lr=_host(hp.lr), beta1=_host(hp.beta1), beta2=_host(hp.beta2), eps=hp.eps,
            weight_decay=hp.weight_decay, amsgrad=o.amsgrad, maximize=o.maximize, decoupled=o.decoupled,
            grad_scale=amp.grad_scale, found_inf=amp.found_inf, decay=decay, **extra)


BACKEND = CpuBackend()


@functools.lru_cache(maxsize=None)
def _unsupported_combination(dtype: torch.dtype, state_dtype: torch.dtype, master: bool, sr: bool) -> str | None:
    if state_dtype not in SUPPORTED_DTYPES:
        return f"state_dtype {state_dtype} is not supported by the cpu kernel"
    return _C.cpu_unsupported(str(dtype), str(state_dtype), master, sr)


def _host(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else x
