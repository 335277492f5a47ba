"""CPU backend: the C++ kernel of fused_adam._C (csrc/cpu), one call per (cpu, dtype) partition.

The kernel checks the tensors, increments every step, computes each tensor's bias corrections from its own step
and runs a SIMD loop (AVX-512 / AVX2 picked at run time) over a chunk table spanning all the partition's tensors,
with threads splitting the work across tensors. This module only turns Tensor hyperparameters into host numbers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import Hyper

NAME = "cpu"
FEATURES: tuple[str, ...] = ()  # none of the optional features of backends/__init__.py yet: auto skips to reference

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
    return None


def _host(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else x


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    if not params:
        return
    decay = None
    if isinstance(hp.lr, Tensor) and hp.decoupled and hp.weight_decay != 0:
        # torch.optim.AdamW computes 1 - lr * wd in lr's dtype when lr is a Tensor; a double factor drifts from
        # it by more than fp64 parity allows over a few steps (torch's own fused path drifts twice as far).
        decay = (1 - hp.lr * hp.weight_decay).item()
    _C.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr=_host(hp.lr), beta1=_host(hp.beta1), beta2=_host(hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
        amsgrad=hp.amsgrad, maximize=hp.maximize, decoupled=hp.decoupled, grad_scale=grad_scale, found_inf=found_inf,
        decay=decay,
    )
