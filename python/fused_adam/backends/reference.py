"""Reference backend: plain PyTorch, one parameter at a time, written like the paper.

It is the fallback wherever no kernel can run and the oracle the kernels are tested against.
fp32/fp64 params follow torch.optim.adam._single_tensor_adam op for op (so the result is bitwise torch's for-loop
path); fp16/bf16 params, and any state stored in a narrower dtype than the math (state_dtype), are computed in
fp32 and rounded once on store, as torch's fused path does. It implements every optional feature.
The kernels (csrc/adam_math.h, backends/triton.py) follow the same order of operations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..plan import check_tensors
from . import LOW_PRECISION, Amp, Backend, Hyper, PartialStep, PartOptions

_M32 = 0xFFFFFFFF
_STREAMS = {"param": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3}  # csrc/rounding.h's Stream


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, part) -> str | None:
        return None  # any device, dtype and option

    def check(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp) -> bool:
        return self._checked_grads(part, grads, amp) is not None

    @staticmethod
    def _checked_grads(part, grads: list[Tensor] | None, amp: Amp, checked: bool = False) -> list[Tensor] | None:
        if grads is None:
            grads = part.grads_from_params()
            if grads is None:
                return None
        if part.params and not checked:
            check_tensors(part, grads, grads_written=amp.grad_scale is not None)  # before anything is written
        return grads

    def step(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp, checked: bool = False) -> bool:
        grads = self._checked_grads(part, grads, amp, checked)
        if grads is None:
            return False
        if not part.params:
            return True
        if amp.found_inf is not None and bool(amp.found_inf.item()):
            return True
        try:
            _step(part.params, grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps,
                  part.options, hp, amp.grad_scale, part.master_params, part.tensor_ids, amp.clip_coef)
        except Exception as e:  # torch's ops raised, tensor by tensor: the earlier tensors are stepped
            raise PartialStep(f"FusedAdam (reference backend): the step of group {part.group_index} failed after "
                              f"stepping some of its params: {type(e).__name__}: {e}") from e
        return True


BACKEND = ReferenceBackend()


def _step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, opts: PartOptions, hp: Hyper,
          grad_scale, master_params, tensor_ids, clip_coef) -> None:
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_scale is not None:
            grad.div_(grad_scale.to(grad.device))
        max_exp_avg_sq = max_exp_avg_sqs[i] if opts.amsgrad else None
        master = master_params[i] if opts.master else None
        state_steps[i] += 1
        stored = {"param": param, "exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i], "max_exp_avg_sq": max_exp_avg_sq}
        if opts.differentiable or all(t is None or t.dtype == param.dtype not in LOW_PRECISION for t in stored.values()) and master is None:
            if clip_coef is not None:
                grad = grad * clip_coef  # torch.nn.utils.clip_grad_norm_'s mul_, without writing the grad back
            _update(param, grad, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sq, state_steps[i], opts, hp)
            continue
        # Some store is narrower than the math: compute in fp32 (fp64 for fp64 params), round once per store.
        wide_dtype = torch.promote_types(param.dtype, torch.float32)
        wide = {k: (t.to(wide_dtype) if t is not None else None) for k, t in stored.items()}
        if master is not None:
            wide["param"] = master  # updated in place; the param is its rounding
        grad = grad.to(wide_dtype)
        if clip_coef is not None:
            grad = grad * clip_coef  # in the math's precision, as csrc/adam_math.h
        _update(wide["param"], grad, wide["exp_avg"], wide["exp_avg_sq"], wide["max_exp_avg_sq"], state_steps[i], opts, hp)
        for k, narrow in stored.items():
            if narrow is None:
                continue
            if opts.sr_param if k == "param" else opts.sr_state:
                salt = sr_salt(opts.seed, int(state_steps[i].item()), tensor_ids[i], _STREAMS[k])
                narrow.copy_(bf16_stochastic(wide[k].float(), salt))
            else:
                narrow.copy_(wide[k])


def _fmix32(h):
    """MurmurHash3's finalizer on uint32 values (Python ints, or int64 tensors holding them)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def sr_seed_part(seed: int) -> int:
    """The part of csrc/rounding.h's sr_salt that depends on the seed alone (the triton kernel finishes the salt)."""
    return _fmix32((seed & _M32) ^ _fmix32(((seed >> 32) + 0x9E3779B9) & _M32))


def sr_salt(seed: int, step: int, tensor: int, stream: int) -> int:
    """csrc/rounding.h's sr_salt."""
    h = _fmix32(sr_seed_part(seed) ^ (step & _M32))
    return _fmix32(h ^ ((tensor * 4 + stream) & _M32))


def bf16_stochastic(x: Tensor, salt: int) -> Tensor:
    """csrc/rounding.h's bf16_bits_sr over a float32 tensor: element i gets the bits sr_bits(salt, i)."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    rand = _fmix32((index & _M32) ^ salt ^ (((index >> 32) * 0x27D4EB2F) & _M32)) & 0xFFFF
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    rounded = (u + rand) >> 16
    rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16).view(torch.bfloat16)
    special = (u & 0x7F800000) == 0x7F800000  # inf and NaN round to nearest (they are already exact)
    return torch.where(special, x.to(torch.bfloat16), rounded)


def _needs_grad(x, opts: PartOptions) -> bool:
    return opts.differentiable and isinstance(x, Tensor) and x.requires_grad


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step_t: Tensor,
    opts: PartOptions,
    hp: Hyper,
) -> None:
    """One tensor's Adam step; step_t has already been incremented."""
    lr, beta1, beta2, eps, weight_decay = hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay
    if opts.maximize:
        grad = -grad

    if weight_decay != 0:
        if opts.decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)

    if isinstance(beta1, Tensor):
        beta1_here: float | Tensor = beta1.to(device=param.device, dtype=param.dtype)
    else:
        beta1_here = beta1
    exp_avg.lerp_(grad, 1 - beta1_here)
    if _needs_grad(beta2, opts):
        exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    if opts.capturable or opts.differentiable:
        # Everything stays a tensor: no host synchronisation, and autograd sees the whole step.
        # (a beta that requires grad: autograd saves the step, which the next step bumps in place; torch clones it)
        bias_correction1 = 1 - beta1**(step_t.clone() if _needs_grad(beta1, opts) else step_t)
        bias_correction2 = 1 - beta2**(step_t.clone() if _needs_grad(beta2, opts) else step_t)
        step_size_neg = (lr / bias_correction1).neg()
        bias_correction2_sqrt = bias_correction2.sqrt()
        if max_exp_avg_sq is not None:
            previous = max_exp_avg_sq.clone() if opts.differentiable else max_exp_avg_sq
            max_exp_avg_sq.copy_(torch.maximum(previous, exp_avg_sq))
            second = max_exp_avg_sq
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
        param.addcdiv_(exp_avg.clone() if opts.differentiable else exp_avg, denom)
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
