"""Reference backend: plain PyTorch, one parameter at a time, written like the paper.

It is the fallback wherever no kernel can run and the oracle the kernels are tested against.
fp32/fp64 params follow torch.optim.adam._single_tensor_adam op for op (so the result is bitwise torch's for-loop
path); fp16/bf16 params are computed in fp32 and rounded once on store, as torch's fused path does.
The kernels (csrc/adam_math.h, backends/triton.py) follow the same order of operations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import Hyper

NAME = "reference"

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def unavailable() -> str | None:
    return None


def unsupported(device: torch.device, dtype: torch.dtype, hp: Hyper) -> str | None:
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
) -> None:
    if not params:
        return
    if found_inf is not None and bool(found_inf.item()):
        return
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_scale is not None:
            grad.div_(grad_scale.to(grad.device))
        max_exp_avg_sq = max_exp_avg_sqs[i] if hp.amsgrad else None
        state_steps[i] += 1
        if param.dtype in _LOW_PRECISION and not hp.differentiable:
            wide = [t.float() for t in (param, grad, exp_avgs[i], exp_avg_sqs[i])]
            wide_max = max_exp_avg_sq.float() if max_exp_avg_sq is not None else None
            _update(*wide, wide_max, state_steps[i], hp)
            for narrow, w in zip((param, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sq), (wide[0], wide[2], wide[3], wide_max)):
                if narrow is not None:
                    narrow.copy_(w)
        else:
            _update(param, grad, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sq, state_steps[i], hp)


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step_t: Tensor,
    hp: Hyper,
) -> None:
    """One tensor's Adam step; step_t has already been incremented."""
    lr, beta1, beta2, eps, weight_decay = hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay
    if hp.maximize:
        grad = -grad

    if weight_decay != 0:
        if hp.decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)

    if isinstance(beta1, Tensor):
        beta1_here: float | Tensor = beta1.to(device=param.device, dtype=param.dtype)
    else:
        beta1_here = beta1
    exp_avg.lerp_(grad, 1 - beta1_here)
    if hp.differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
        exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    if hp.capturable or hp.differentiable:
        # Everything stays a tensor: no host synchronisation, and autograd sees the whole step.
        bias_correction1 = 1 - beta1**step_t
        bias_correction2 = 1 - beta2**step_t
        step_size_neg = (lr / bias_correction1).neg()
        bias_correction2_sqrt = bias_correction2.sqrt()
        if max_exp_avg_sq is not None:
            previous = max_exp_avg_sq.clone() if hp.differentiable else max_exp_avg_sq
            max_exp_avg_sq.copy_(torch.maximum(previous, exp_avg_sq))
            second = max_exp_avg_sq
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
        param.addcdiv_(exp_avg.clone() if hp.differentiable else exp_avg, denom)
        return

    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
