"""The parity harness every backend's tests use: torch.optim.Adam/AdamW is the oracle.

OPTIM_INPUTS is the option table in the style of torch's `OptimizerInput(kwargs, desc)` list
(torch.testing._internal.common_optimizers.optim_inputs_func_adam), extended with the options torch's table
covers only on CUDA or not at all.

Tolerances:
  * fp32/fp64: the reference backend is bitwise torch's for-loop path (same ops in the same order); a kernel
    backend must match within `torch.testing.assert_close`'s defaults for the dtype.
  * fp16/bf16: derived, not tuned (flash-attention's rule). Torch computes in the low dtype with a rounding
    after every op; we compute in fp32 and round once per store. Both are compared with an fp64 run on the
    same (upcast) inputs, and ours must be at most K_LOW_PRECISION times torch's own error, plus one ulp at
    the largest magnitude (so a tensor where torch's roundings happen to land exactly does not demand that ours
    do too: one rounding of a store is half an ulp, and the stored states carry theirs into the next step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import os

from fused_adam import FusedAdam, FusedAdamW, backends

K_LOW_PRECISION = 2.0
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# 1, odd sizes, a 0-element tensor, multi-dim tensors.
SHAPES = ((1,), (7,), (0,), (3, 5), (2, 3, 4), (67,))


@dataclass(frozen=True)
class OptimizerInput:
    kwargs: dict
    desc: str

    def __repr__(self) -> str:
        return self.desc


def _inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.01}, "non-default lr"),
        OptimizerInput({"weight_decay": 0.1}, "nonzero weight_decay"),
        OptimizerInput({"weight_decay": 0.1, "maximize": True}, "maximize"),
        OptimizerInput({"weight_decay": 0.1, "amsgrad": True}, "amsgrad"),
        OptimizerInput({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled_weight_decay"),
        OptimizerInput({"weight_decay": 0.1, "amsgrad": True, "maximize": True, "decoupled_weight_decay": True}, "everything"),
        OptimizerInput({"lr": torch.tensor(0.01)}, "Tensor lr"),
        OptimizerInput({"lr": torch.tensor([0.01]), "betas": (torch.tensor(0.8), torch.tensor([0.95]))}, "Tensor lr and betas"),
        OptimizerInput({"eps": 0.1, "betas": (0.5, 0.6)}, "large eps, unusual betas"),
        OptimizerInput({"betas": (0.0, 0.0)}, "zero betas"),
    ]


OPTIM_INPUTS = _inputs()

# Tensor lr / betas that torch's for-loop turns into 0-dim tensor math: bias corrections, step size, sqrt(bc2),
# 1 - beta2 and AdamW's 1 - lr * wd in the tensors' dtype (float32 here, float64 in one case), not in double. Chosen
# so that computing them in double drifts past assert_close within 20 steps (fp64 params; fp32 with beta2 near 1).
TENSOR_HYPER_INPUTS = [
    OptimizerInput({"lr": 0.1, "betas": (torch.tensor(0.5), torch.tensor(0.9999))}, "Tensor betas"),
    OptimizerInput({"lr": torch.tensor(0.1), "betas": (torch.tensor(0.9), torch.tensor(0.999)), "weight_decay": 0.1},
                   "Tensor lr and betas, weight_decay"),
    OptimizerInput({"lr": torch.tensor(2.0), "weight_decay": 0.1}, "Tensor lr 2.0, weight_decay"),
    OptimizerInput({"lr": torch.tensor(0.1), "betas": (torch.tensor(0.5), torch.tensor(0.9999)), "weight_decay": 0.1,
                    "amsgrad": True, "maximize": True}, "Tensor lr and betas, amsgrad, maximize"),
    OptimizerInput({"lr": 0.1, "betas": (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)),
                    "weight_decay": 0.1}, "float64 Tensor betas"),
]


def backends_here() -> list[str]:
    """The backends that run CPU tensors in this process: reference, cpu where the extension is built, triton under
    TRITON_INTERPRET=1 (its kernels on CPU tensors). Test bodies are parametrized by these."""
    names = ["reference"]
    if backends.unavailable("cpu") is None:
        names.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and backends.unavailable("triton") is None:
        names.append("triton")
    return names


def make_params(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def make_grads(params, step: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _adjust(kwargs: dict, dtype: torch.dtype) -> dict:
    kwargs = dict(kwargs)
    if dtype == torch.float16:
        kwargs["eps"] = max(kwargs.get("eps", 1e-8), 0.1)  # torch's table does the same: 1e-8 underflows in fp16
    return kwargs


def run(opt_cls, kwargs: dict, params0: list[torch.Tensor], steps: int, grad_seed: int = 0, dtype=None, **extra):
    """Train copies of params0 (cast to dtype) for `steps` steps on the same grads; return (params, optimizer)."""
    params = [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params0]
    opt = opt_cls(params, **kwargs, **extra)
    for s in range(steps):
        for p, g in zip(params, make_grads(params0, s, grad_seed)):
            p.grad = g.to(p.dtype)
        opt.step()
    return params, opt


def states(opt, params) -> list[dict[str, torch.Tensor]]:
    return [dict(opt.state[p]) for p in params]


def assert_parity(backend: str, cls_name: str, kwargs: dict, dtype: torch.dtype, steps: int = 20, shapes=SHAPES):
    """FusedAdam(W) on `backend` against torch.optim.Adam(W) on params and every state tensor."""
    kwargs = _adjust(kwargs, dtype)
    if cls_name == "AdamW":
        kwargs.pop("decoupled_weight_decay", None)
    ours_cls = FusedAdamW if cls_name == "AdamW" else FusedAdam
    torch_cls = torch.optim.AdamW if cls_name == "AdamW" else torch.optim.Adam
    params0 = make_params(dtype, shapes)
    ours_p, ours = run(ours_cls, kwargs, params0, steps, backend=backend)
    ref_p, ref = run(torch_cls, kwargs, params0, steps)
    ours_s, ref_s = states(ours, ours_p), states(ref, ref_p)
    names = ["param"] + [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in ref_s[0]]
    for d in ours.dispatch[0]:
        assert d.backend == backend, (d, backend)
    if dtype not in LOW_PRECISION:
        exact = backend == "reference"
        tol = dict(atol=0, rtol=0) if exact else {}
        for i in range(len(params0)):
            for name in names:
                a = ours_p[i] if name == "param" else ours_s[i][name]
                b = ref_p[i] if name == "param" else ref_s[i][name]
                torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"{name} of param {i}: {m}")
            assert float(ours_s[i]["step"]) == float(ref_s[i]["step"]) == steps
        return
    # Low precision: compare both against an fp64 run on the same inputs.
    wide_p, wide = run(torch_cls, kwargs, [p.double() for p in params0], steps, dtype=torch.float64)
    wide_s = states(wide, wide_p)
    for i in range(len(params0)):
        if params0[i].numel() == 0:
            continue
        for name in names:
            pick = (lambda ps, ss: ps[i].detach()) if name == "param" else (lambda ps, ss: ss[i][name])
            exact = pick(wide_p, wide_s)
            ours_err = (pick(ours_p, ours_s).double() - exact).abs().max().item()
            torch_err = (pick(ref_p, ref_s).double() - exact).abs().max().item()
            floor = torch.finfo(dtype).eps * exact.abs().max().item()
            assert ours_err <= K_LOW_PRECISION * torch_err + floor, (
                f"{name} of param {i}: error vs fp64 {ours_err:.3g} > {K_LOW_PRECISION} x torch's {torch_err:.3g} + {floor:.3g}"
            )


def assert_tensor_hyper_per_tensor_steps(backend: str, dtype: torch.dtype, steps: int = 22):
    """FusedAdamW on `backend` against torch.optim.AdamW(foreach=False) with Tensor lr and betas and step counts that
    differ within the partition (the odd params have no grad for the first 4 steps): params and every state."""
    kwargs = dict(lr=torch.tensor(0.1), betas=(torch.tensor(0.5), torch.tensor(0.9999)), weight_decay=0.1)
    params0 = make_params(dtype, SHAPES + ((1024,),))
    results = []
    for cls, extra in ((FusedAdamW, dict(backend=backend)), (torch.optim.AdamW, dict(foreach=False))):
        params = [p.detach().clone().requires_grad_() for p in params0]
        opt = cls(params, **kwargs, **extra)
        for s in range(steps):
            for i, (p, g) in enumerate(zip(params, make_grads(params0, s))):
                p.grad = g if s >= 4 or i % 2 == 0 else None
            opt.step()
        results.append((params, opt))
    (ours_p, ours), (ref_p, ref) = results
    assert {float(ours.state[p]["step"]) for p in ours_p} == {steps, steps - 4}
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m: f"param {i}: {m}")
        for k, v in ref.state[b].items():
            torch.testing.assert_close(ours.state[a][k], v, msg=lambda m: f"{k} of param {i}: {m}")


# ---- the options beyond torch: one table for every backend ------------------------------------------------------

# (param dtype, options): every storage layout a kernel compiles (fp32 params with bf16 states, bf16/fp16 params with
# fp32 states or an fp32 master, bf16 everywhere) and the combinations that share a store (stochastic rounding with a
# master or with bf16 states), with amsgrad, clipping and capturable where they change the kernel's path.
FEATURE_CASES = [
    (torch.float32, dict(state_dtype=torch.bfloat16, amsgrad=True)),
    (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True, seed=2**40 + 3, amsgrad=True)),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True)),  # the states round stochastically
    (torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(stochastic_rounding=True, seed=5, amsgrad=True)),
    (torch.bfloat16, dict(state_dtype=torch.float32, amsgrad=True)),
    (torch.bfloat16, dict(state_dtype=torch.float32, stochastic_rounding=True)),  # the params round stochastically
    (torch.bfloat16, dict(state_dtype=torch.float32, master_weights=True)),
    (torch.bfloat16, dict(stochastic_rounding=True, capturable=True, amsgrad=True)),
    (torch.float16, dict(master_weights=True, amsgrad=True)),
    (torch.float16, dict(state_dtype=torch.float32)),
    (torch.float16, dict(state_dtype=torch.float32, master_weights=True)),
    (torch.float32, dict(max_grad_norm=0.5, amsgrad=True)),
    (torch.float32, dict(max_grad_norm=0.5, state_dtype=torch.bfloat16, stochastic_rounding=True, capturable=True)),
]


def feature_id(case) -> str:
    dtype, kw = case
    return str(dtype).replace("torch.", "") + "-" + "-".join(
        f"{k}={str(v).replace('torch.', '')}" if not isinstance(v, bool) else k for k, v in kw.items())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width (bitwise comparisons that see -0.0 and NaN payloads)."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def train(backend: str, params0, steps: int = 3, cls=FusedAdamW, grad_seed: int = 0, make=None, **kwargs):
    """Copies of params0 (or make()'s params) after `steps` steps on grads seeded by grad_seed (an optimizer's
    `seed=`, stochastic rounding's, passes through in kwargs); returns (params, optimizer)."""
    params = make() if make else [p.detach().clone() for p in params0]
    params = [p.requires_grad_() for p in params]
    opt = cls(params, backend=backend, **kwargs)
    for s in range(steps):
        for p, g in zip(params, make_grads(params0, s, grad_seed)):
            p.grad = g.to(p.dtype)
        opt.step()
    return params, opt
