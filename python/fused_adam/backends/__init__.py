"""Backend registry.

Every backend is a module in this package that exposes the same three names:

    NAME: str
    unavailable() -> str | None
        Why the backend cannot run at all in this process (import or build error), or None.
    unsupported(device: torch.device, dtype: torch.dtype, hp: Hyper) -> str | None
        Why it cannot run a partition of a group with these tensors and options, or None.
    step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, grad_scale, found_inf) -> None

The `step` contract (the same for every backend, see NOTE [backend step contract] in optimizer.py):
  * all tensors are on one device, params share one real dtype (complex params arrive as view_as_real views);
    grads, exp_avgs, exp_avg_sqs and max_exp_avg_sqs have the param's dtype and shape, any strides;
  * max_exp_avg_sqs is empty unless hp.amsgrad;
  * state_steps are float32 0-dim tensors: each is incremented by one and the update uses the new value;
  * grad_scale (AMP): grads are divided by it in place, and the update uses the unscaled grad;
  * found_inf (AMP): if nonzero, nothing changes at all (params, grads, states and steps).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# auto's order of preference, by device type. Anything else runs on the reference backend.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclass(frozen=True)
class Hyper:
    """The options of one param group, as a backend sees them."""

    lr: float | torch.Tensor
    beta1: float | torch.Tensor
    beta2: float | torch.Tensor
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool
    capturable: bool
    differentiable: bool


_modules: dict[str, ModuleType | BaseException] = {}


def check_name(name: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {name!r}; expected 'auto' or one of {', '.join(BACKEND_NAMES)}")


def get(name: str) -> ModuleType:
    """The backend module, or raise the error that importing it raised."""
    check_name(name)
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except Exception as e:  # a broken optional backend must not break the package
            _modules[name] = e
    mod = _modules[name]
    if isinstance(mod, BaseException):
        raise mod
    return mod


def unavailable(name: str) -> str | None:
    """Why backend `name` cannot run in this process, or None."""
    try:
        mod = get(name)
    except Exception as e:
        return f"import failed: {type(e).__name__}: {e}"
    return mod.unavailable()


def available_backends() -> list[str]:
    """The backends that can run in this process (each may still decline some devices or dtypes)."""
    return [n for n in BACKEND_NAMES if unavailable(n) is None]


def candidates(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, ("reference",))
