"""Helpers for the cpu kernel's tests (test_cpu_backend.py, test_cpu_features.py): calls of the kernel on lists built
by hand, through _C.Partition and through the op, with the options decided by PartOptions.of as the optimizer's
are; thread-count and ISA switches; bitwise comparisons."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from fused_adam.backends import Amp, Hyper, PartOptions
from fused_adam.plan import Partition


def _C():
    from fused_adam import _C

    return _C


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cpu_isa(name: str):
    C = _C()
    before = C.cpu_isa()
    C.set_cpu_isa(name)
    try:
        yield
    finally:
        C.set_cpu_isa(before)


def supported_isas() -> list[str]:
    out = []
    for name in ("avx512bf16", "avx512", "avx2", "baseline"):
        try:
            with cpu_isa(name):
                out.append(name)
        except RuntimeError:
            pass
    return out


def group_of(dtype: torch.dtype, **overrides) -> dict:
    """A param group's options as the optimizer holds them (torch's defaults), with overrides."""
    group = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
                 maximize=False, capturable=False, differentiable=False, foreach=None, fused=None)
    group.update(overrides)
    return group


def make_part(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, options: PartOptions, *, master_params=(),
              tensor_ids=(), device=None) -> Partition:
    """A plan.Partition built by hand (what the optimizer's step plan builds)."""
    dtype = options.param_dtype
    return Partition(
        group_index=0, device=torch.device(device or (params[0].device if params else "cpu")), dtype=dtype,
        options=options, index=None, params=list(params), exp_avgs=list(exp_avgs), exp_avg_sqs=list(exp_avg_sqs),
        max_exp_avg_sqs=list(max_exp_avg_sqs), state_steps=list(state_steps), master_params=list(master_params),
        tensor_ids=list(tensor_ids) or list(range(len(params))), view_pos=[],
    )


def kernel_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                weight_decay, amsgrad, maximize, decoupled, grad_scale=None, found_inf=None, clip_coef=None,
                master_params=(), stochastic_rounding=False, tensor_ids=(), seed=0, chunk_size=0, master=None):
    """One call of the cpu kernel on these lists through _C.Partition.step_, the options decided by PartOptions.of as
    the optimizer's are (master: force PartOptions.master, to see the kernel's own check)."""
    dtype = params[0].dtype if params else torch.float32
    group = group_of(dtype, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled, amsgrad=amsgrad,
                     maximize=maximize, master_weights=bool(master_params),
                     state_dtype=exp_avgs[0].dtype if exp_avgs else None, stochastic_rounding=stochastic_rounding,
                     seed=seed)
    options = PartOptions.of(group, dtype, clip=clip_coef is not None)
    if master is not None:
        options = dataclasses.replace(options, master=master)
    part = _C().Partition(list(params), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
                          master_params=list(master_params), tensor_ids=list(tensor_ids), options=options)
    return part.step_(grads, Hyper(lr, beta1, beta2, eps, weight_decay), Amp(grad_scale, found_inf, clip_coef),
                      chunk_size=chunk_size)


def op_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, decoupled, stochastic_rounding=False, master_params=(), **kwargs):
    """The same call through torch.ops.fused_adam.adam_step_ (the dispatcher's way in)."""
    dtype = params[0].dtype
    group = group_of(dtype, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled, amsgrad=amsgrad,
                     maximize=maximize, master_weights=bool(master_params), state_dtype=exp_avgs[0].dtype,
                     stochastic_rounding=stochastic_rounding)
    o = PartOptions.of(group, dtype, clip=kwargs.get("clip_coef") is not None)
    torch.ops.fused_adam.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, wd_mode=int(o.wd_mode), amsgrad=amsgrad, maximize=maximize,
        master_params=list(master_params) or None, sr_param=o.sr_param, sr_state=o.sr_state, **kwargs)


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), f"tensor {i}: max diff {(x.double() - y.double()).abs().max().item()}"


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, where=None):
    """Two tensors of one 16-bit float dtype: the same bits, except that a NaN may be another NaN (sign, payload).
    When an add or an FMA meets two NaNs (a NaN param and a NaN made by the update), which one it returns follows
    the instruction's operand order, which the compiler picks per ISA and loop; fp16 stores and bf16's stochastic
    rounding keep what they get (bf16's rounding to nearest makes every NaN 0x7FC0)."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), where
    assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan]), where


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a's 16-bit dtype lie between a and b (+0 and -0 count as one)."""

    def key(t):
        u = t.contiguous().view(torch.int16).int() & 0xFFFF
        return torch.where(u >= 0x8000, -(u & 0x7FFF), u)

    return (key(a) - key(b)).abs()
