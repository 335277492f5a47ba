"""CUDA backend: the multi-tensor-apply kernel of csrc/cuda (extension module fused_adam._C_cuda).

One launch per 320 chunks of 64K elements spanning all tensors of a partition, metadata in the kernel parameters,
128-bit accesses where every buffer is 16-byte aligned; the per-element math is csrc/adam_math.h, shared with the
CPU kernel. Non-capturable steps (CPU step tensors) get their bias corrections from the host; capturable steps read
step and lr on the device, so step() can be captured in a CUDA graph.

All the optional features (backends/__init__.py): fp32 master weights, states in their own dtype (float32 params
with bfloat16 states, bfloat16/float16 params with float32 states), stochastic rounding (per-tensor salts from the
host, or from the device step when capturable), and clipping by a coefficient the kernel reads on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from types import SimpleNamespace

from . import Amp, Backend, Hyper

NAME = "cuda"
FEATURES = ("master_weights", "state_dtype", "stochastic_rounding", "clip")

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# state_dtype other than the param's: the (param, state) pairs compiled in csrc/cuda (adam_cuda_<pair>.cu).
_STATE_PAIRS = {(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)}

try:
    from .. import _C_cuda  # type: ignore[attr-defined]

    _IMPORT_ERROR: BaseException | None = None
except Exception as e:  # not built here (no CUDA torch or no nvcc), or a broken build
    _C_cuda = None
    _IMPORT_ERROR = e


def unavailable() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if _C_cuda is None:
        return f"extension fused_adam._C_cuda is not built: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    return None


def unsupported(device: torch.device, dtype: torch.dtype, hp: Hyper) -> str | None:
    if device.type != "cuda":
        return f"runs on CUDA devices only, got {device}"
    return unsupported_options(dtype, hp)


def unsupported_options(dtype: torch.dtype, hp: Hyper) -> str | None:
    """Why the kernels cannot run these dtypes and options on any device, or None."""
    if dtype not in _SUPPORTED:
        return f"dtype {dtype} is not supported (float32, float64, bfloat16, float16)"
    if hp.differentiable:
        return "differentiable=True needs autograd through the step (the reference backend does it)"
    if hp.state_dtype is not None and hp.state_dtype != dtype and (dtype, hp.state_dtype) not in _STATE_PAIRS:
        return (f"state_dtype {hp.state_dtype} with {dtype} params is not compiled (float32 params with bfloat16 "
                "states, bfloat16/float16 params with float32 states)")
    if hp.master_weights and dtype not in (torch.bfloat16, torch.float16):
        return f"master_weights with {dtype} params (masters are for bfloat16/float16 params)"
    return None


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
    *,
    master_params: list[Tensor] | None = None,
    tensor_ids: list[int] | None = None,
    clip_coef: Tensor | None = None,
) -> None:
    if not params:
        return
    device = params[0].device
    lr, lr_tensor = hp.lr, None
    if isinstance(lr, Tensor):
        if hp.capturable and lr.device.type == "cuda":
            lr_tensor = lr.to(device=device, dtype=torch.float64, non_blocking=True)  # read by the kernel
            lr = 0.0
        else:
            lr = lr.item()  # a host read, as torch's fused Adam does for a CPU lr
    # Betas are host scalars (torch's fused kernel takes them as doubles too): a Tensor beta is read here.
    beta1 = hp.beta1.item() if isinstance(hp.beta1, Tensor) else hp.beta1
    beta2 = hp.beta2.item() if isinstance(hp.beta2, Tensor) else hp.beta2
    decay = None
    if isinstance(hp.lr, Tensor) and hp.decoupled and hp.weight_decay != 0 and lr_tensor is None:
        decay = (1 - hp.lr * hp.weight_decay).item()  # in lr's dtype, as torch.optim.AdamW computes it
    _C_cuda.adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        float(lr), lr_tensor, float(beta1), float(beta2), float(hp.eps), float(hp.weight_decay),
        hp.amsgrad, hp.maximize, hp.decoupled, hp.capturable, grad_scale, found_inf, decay,
        master_params=master_params or [], tensor_ids=tensor_ids or [],
        stochastic_rounding=hp.stochastic_rounding, seed=hp.seed, clip_coef=clip_coef,
    )


def _legacy_hyper(part, hp: Hyper) -> SimpleNamespace:
    """Interim: the old per-call options object this module's step() reads."""
    o = part.options
    return SimpleNamespace(lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay,
                           amsgrad=o.amsgrad, maximize=o.maximize, decoupled=o.decoupled, capturable=o.capturable,
                           differentiable=o.differentiable, master_weights=o.master,
                           state_dtype=None if o.state_dtype == o.param_dtype else o.state_dtype,
                           stochastic_rounding=o.stochastic_rounding, seed=o.seed, clip=o.clip)


class _Adapter(Backend):
    name = 'cuda'

    def unavailable(self) -> str | None:
        return unavailable()

    def supports(self, part) -> str | None:
        return unsupported(part.device, part.dtype, _legacy_hyper(part, Hyper(0.0, 0.0, 0.0, 0.0, 0.0)))

    def step(self, part, grads, hp: Hyper, amp: Amp) -> bool:
        if grads is None:
            grads = part.grads_from_params()
            if grads is None:
                return False
        extra = {}
        if part.options.master:
            extra["master_params"] = part.master_params
        if part.options.stochastic_rounding:
            extra["tensor_ids"] = part.tensor_ids
        step(part.params, grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps,
             _legacy_hyper(part, hp), amp.grad_scale, amp.found_inf, clip_coef=amp.clip_coef, **extra)
        return True


BACKEND = _Adapter()
