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

from . import Hyper

NAME = "cpu"
FEATURES = ("master_weights", "state_dtype", "stochastic_rounding", "clip")
REJECTS_SPARSE = True  # the kernel checks every tensor's layout before it writes anything
READS_GRADS = True  # grads=None: the kernel reads each param's .grad (NOTE [grads read in C++] in csrc/ops.cpp)
USES_CACHE = True  # cache["partition"]: the lists converted to C++ once (NOTE [cpu partition] in csrc/ops.cpp)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C
except Exception as e:  # the package imports without its native part; auto then falls back to reference
    _C = None
    _IMPORT_ERROR: str | None = f"fused_adam._C could not be imported ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"
else:
    _IMPORT_ERROR = None


def unavailable() -> str | None:
    return _IMPORT_ERROR


def unsupported(device: torch.device, dtype: torch.dtype, hp: Hyper) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on cpu tensors only, not {device.type}"
    if hp.differentiable:
        return "differentiable=True needs autograd through the step, which only the reference backend keeps"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the cpu kernel (float32, float64, bfloat16, float16 are)"
    if hp.state_dtype is not None or hp.master_weights or hp.stochastic_rounding:
        return _unsupported_combination(dtype, hp.state_dtype or dtype, hp.master_weights, hp.stochastic_rounding)
    return None


@functools.lru_cache(maxsize=None)
def _unsupported_combination(dtype: torch.dtype, state_dtype: torch.dtype, master: bool, sr: bool) -> str | None:
    if state_dtype not in SUPPORTED_DTYPES:
        return f"state_dtype {state_dtype} is not supported by the cpu kernel"
    return _C.cpu_unsupported(str(dtype), str(state_dtype), master, sr)


def _host(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else x


def step(
    params: list[Tensor],
    grads: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    master_params: list[Tensor] | None = None,
    tensor_ids: list[int] | None = None,
    clip_coef: Tensor | None = None,
    cache: dict | None = None,
) -> bool:
    if not params:
        return True
    extra = {}
    lists = {}
    if master_params:
        lists["master_params"] = master_params
    if hp.stochastic_rounding:
        seed = hp.seed & 0xFFFFFFFFFFFFFFFF
        lists["tensor_ids"] = tensor_ids
        extra.update(stochastic_rounding=True, seed=seed - (1 << 64) if seed >= 1 << 63 else seed)
    if clip_coef is not None:
        extra["clip_coef"] = clip_coef
    decay = None
    if isinstance(hp.lr, Tensor) and hp.decoupled and hp.weight_decay != 0:
        # torch.optim.AdamW computes 1 - lr * wd in lr's dtype when lr is a Tensor; a double factor drifts from
        # it by more than fp64 parity allows over a few steps (torch's own fused path drifts twice as far).
        decay = (1 - hp.lr * hp.weight_decay).item()
    args = dict(
        lr=_host(hp.lr), beta1=_host(hp.beta1), beta2=_host(hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
        amsgrad=hp.amsgrad, maximize=hp.maximize, decoupled=hp.decoupled, grad_scale=grad_scale, found_inf=found_inf,
        decay=decay, **extra,
    )
    partition = cache.get("partition") if cache is not None else None  # direct callers: made for this call
    if partition is None:
        partition = _C.Partition(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **lists)
        if cache is not None:
            cache["partition"] = partition
    return partition.step_(grads, **args)
