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

Optional features (the options beyond torch's). A backend lists the ones it implements in `FEATURES`; the
optimizer never hands a backend a partition that needs one it lacks (auto skips it, saying which), and passes
the extra keyword arguments only when the feature is on:
  * "master_weights": hp.master_weights; kwarg master_params (fp32 copies of the low-precision params): the
    update runs on the master and the param gets the master rounded to nearest;
  * "state_dtype": hp.state_dtype is not None: exp_avg/exp_avg_sq/max_exp_avg_sq are stored in that dtype
    (fp32 math, one rounding per store);
  * "stochastic_rounding": hp.stochastic_rounding; kwarg tensor_ids (one int per tensor): bf16 stores that are
    the only copy of a value (params without a master, states) round stochastically with the bits of
    csrc/rounding.h, a pure function of (hp.seed, step, tensor id, stream, element index);
  * "clip": kwarg clip_coef, a 0-dim fp32 tensor on the partition's device: the (unscaled) grad is multiplied
    by it inside the pass (gradient clipping by global norm without another pass over the grads).

A backend with `READS_GRADS = True` also takes grads=None: it then reads each param's `.grad` itself (plain
Tensor/Parameter params), and returns False, having changed nothing, if one has none (True when it stepped).
A backend with `REJECTS_SPARSE = True` raises a RuntimeError for a sparse (any non-strided) grad before it changes
anything, so the optimizer skips its own per-grad scan and only words the error. A backend with
`USES_CACHE = True` also takes kwarg `cache`: a dict the caller keeps per partition for as long
as it hands the same lists (the optimizer's step plan, NOTE [step plan] in optimizer.py), where the backend may
keep what it prepares from them. Direct callers may leave it out.
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
    master_weights: bool = False
    state_dtype: torch.dtype | None = None
    stochastic_rounding: bool = False
    seed: int = 0
    clip: bool = False

    def features(self) -> tuple[str, ...]:
        """The optional features (see above) this partition needs."""
        wanted = {
            "master_weights": self.master_weights,
            "state_dtype": self.state_dtype is not None,
            "stochastic_rounding": self.stochastic_rounding,
            "clip": self.clip,
        }
        return tuple(name for name, on in wanted.items() if on)


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


def missing_features(mod: ModuleType, hp: Hyper) -> str | None:
    """Why backend `mod` cannot run a partition that needs hp.features(), or None."""
    missing = [f for f in hp.features() if f not in getattr(mod, "FEATURES", ())]
    return f"does not implement {', '.join(missing)}" if missing else None


def candidates(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, ("reference",))
