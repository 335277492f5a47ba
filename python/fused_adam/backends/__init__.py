"""Backend registry and the one interface every backend implements.

A backend is an object (one per process, `get(name)`) of a subclass of `Backend`:

    name: str
    unavailable() -> str | None
        Why the backend cannot run at all in this process (import or build error), or None.
    supports(part) -> str | None
        Why it cannot run this partition (its device, dtype and options: part.device, part.dtype, part.options),
        or None. Called once per partition, when the step plan is built.
    prepare(part) -> None
        Once per partition, after supports() said yes: whatever the backend keeps across steps goes into
        part.prepared (the CPU backend: the lists converted to C++ once; triton and cuda: the device table).
        The partition, and so what was prepared, lives as long as the plan (NOTE [step plan] in plan.py).
    step(part, grads, hp, amp, checked=False) -> bool
        One step of every tensor of the partition, in place. Returns True. With grads=None (only offered when
        part.reads_grads) the backend reads each param's .grad itself (natively, or part.grads_from_params());
        it then returns False, having changed nothing, if a param has no grad. checked=True: check() just passed
        with these arguments, and nothing but other partitions' steps ran since; the backend may step on what it
        found then instead of checking again.
    check(part, grads, hp, amp) -> bool
        What step() checks before it writes, and nothing else: raises what step() would raise for these
        arguments, returns False where step() would (grads=None and a param without a grad), else True. A step
        of several partitions checks every one before it steps any (NOTE [all checked first] in optimizer.py).

The step contract (the same for every backend):
  * all tensors are on part.device; params share one real dtype (complex params arrive as view_as_real views,
    DTensor params as their local shards); grads have the param's dtype and shape, any strides; states have
    part.options.state_dtype and the param's shape, any strides;
  * part.max_exp_avg_sqs is empty unless options.amsgrad; part.master_params is empty unless options.master;
  * part.state_steps are float32 0-dim tensors (on the device when options.capturable, else on the CPU): each is
    incremented by one and the update uses the new value;
  * amp.grad_scale: grads are divided by it in place, and the update uses the unscaled grad;
  * amp.found_inf: if nonzero, nothing changes at all (params, grads, states and steps);
  * amp.clip_coef (options.clip): a 0-dim fp32 tensor; the unscaled grad is multiplied by it for the update only;
  * bad input (a shape, dtype, device or layout that does not match) raises before anything is written; an error
    after a write is raised as PartialStep.

The options beyond torch (PartOptions) are decided once per partition, in one place (PartOptions.of), and
backends read them: they never re-derive which stores round stochastically or which weight-decay mode applies.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from ..plan import Partition

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# auto's order of preference, by device type. Anything else runs on the reference backend.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

LOW_PRECISION = (torch.float16, torch.bfloat16)


class PartialStep(RuntimeError):
    """A backend's step failed after it had written part of its partition (the contract above says it raises before
    anything is written: this is the error of a check that was missing). The optimizer neither retries the step nor
    undoes the states it made for it: what was written stays, and the message says so."""


class WeightDecay(enum.IntEnum):
    """csrc/common/options.h's WeightDecay: none, L2 (Adam: grad += wd * param), decoupled (AdamW)."""

    NONE = 0
    L2 = 1
    DECOUPLED = 2


class Hyper(NamedTuple):  # (a NamedTuple: made every step, a third of a frozen dataclass's cost)
    """A group's hyperparameters as read at this step: floats, or 0-dim Tensors (lr and betas may be Tensors,
    e.g. a scheduler's; capturable backends read those on the device)."""

    lr: float | torch.Tensor
    beta1: float | torch.Tensor
    beta2: float | torch.Tensor
    eps: float
    weight_decay: float


class TensorHyper(NamedTuple):
    """NOTE [tensor hyperparameters] (csrc/common/options.h): with a Tensor lr, beta1 or beta2, torch's for-loop
    (torch/optim/adam.py _single_tensor_adam, capturable=False) computes the step's scalars as 0-dim tensor math in
    the tensors' dtype where a Tensor enters them, not in double as with floats. These are those scalars, computed
    with torch's own expressions on the host, for a backend that hands its kernel the values (triton; the native
    bindings do the same in C++, csrc/common/py_options.h's TensorHyper). lr, beta1, beta2: numbers, or 0-dim
    tensors, detached, on the CPU."""

    lr: float | torch.Tensor
    beta1: float | torch.Tensor
    beta2: float | torch.Tensor

    @staticmethod
    def of(hp: Hyper) -> TensorHyper | None:
        """The step's Tensor hyperparameters, or None when lr and betas are numbers (the double path, as before)."""
        lr, beta1, beta2 = hp.lr, hp.beta1, hp.beta2
        if not (isinstance(lr, torch.Tensor) or isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor)):
            return None
        # (a number is a Python float, as the native bindings read it: a NumPy float32 beside a Tensor is not
        # computed in float32, as torch's for-loop would)
        host = lambda x: x.detach().to("cpu").reshape(()) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
        return TensorHyper(host(lr), host(beta1), host(beta2))

    def lerp_weight(self, math_dtype: torch.dtype) -> float:
        """exp_avg.lerp_(grad, 1 - beta1): torch's weight is 1 - beta1.to(param.dtype); here in the math dtype."""
        beta1 = self.beta1
        return (1 - beta1.to(math_dtype)).item() if isinstance(beta1, torch.Tensor) else 1.0 - beta1

    def one_minus_beta2(self) -> float:
        """addcmul_'s value=1 - beta2, in beta2's dtype."""
        beta2 = self.beta2
        return (1 - beta2).item() if isinstance(beta2, torch.Tensor) else 1.0 - beta2

    def decay(self, weight_decay: float) -> float:
        """AdamW's param.mul_(1 - lr * weight_decay), in lr's dtype."""
        lr = self.lr
        return (1 - lr * weight_decay).item() if isinstance(lr, torch.Tensor) else 1.0 - lr * weight_decay

    def step_pair(self, step: float) -> tuple[float, float]:
        """This step's (-step_size, bias_correction2_sqrt), torch's lines as they are (step: a float, as torch's
        _get_value(step_t))."""
        lr, beta1, beta2 = self
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        return -float(step_size), float(bias_correction2_sqrt)


class Amp(NamedTuple):
    """What a step takes beyond the hyperparameters, each on the partition's device or None."""

    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    clip_coef: torch.Tensor | None = None


@dataclass(frozen=True)
class PartOptions:
    """A partition's options as they apply to its dtype, decided once (the step plan's key covers every input).

    state_dtype is never None (the param's dtype, or fp32 with masters, unless the group asks for another).
    master: the params are bf16/fp16 and keep fp32 masters. sr_param / sr_state: which stores round
    stochastically: a bf16 store that is the only copy of a value (a bf16 param without a master; bf16 states)."""

    param_dtype: torch.dtype
    state_dtype: torch.dtype
    master: bool
    sr_param: bool
    sr_state: bool
    wd_mode: WeightDecay
    amsgrad: bool
    maximize: bool
    capturable: bool
    differentiable: bool
    clip: bool
    seed: int
    tensor_lr: bool  # lr is a Tensor (AdamW's decay factor is then computed in its dtype, as torch does)

    @property
    def stochastic_rounding(self) -> bool:
        return self.sr_param or self.sr_state

    @property
    def decoupled(self) -> bool:
        return self.wd_mode == WeightDecay.DECOUPLED

    @staticmethod
    def of(group: dict[str, Any], dtype: torch.dtype, clip: bool) -> PartOptions:
        """The options of a (device, dtype) partition of `group`. The one place that decides them."""
        master = bool(group.get("master_weights", False)) and dtype in LOW_PRECISION
        # Master weights keep fp32 states unless state_dtype says otherwise (TransformerEngine's and DeepSpeed's
        # default): a bf16 model with masters then steps bitwise like the fp32 run it tracks.
        state_dtype = group.get("state_dtype") or (torch.float32 if master else dtype)
        sr = bool(group.get("stochastic_rounding", False))
        wd = group["weight_decay"]
        wd_mode = WeightDecay.NONE if wd == 0 else (WeightDecay.DECOUPLED if group["decoupled_weight_decay"] else WeightDecay.L2)
        return PartOptions(
            param_dtype=dtype, state_dtype=state_dtype, master=master,
            sr_param=sr and dtype == torch.bfloat16 and not master, sr_state=sr and state_dtype == torch.bfloat16,
            wd_mode=wd_mode, amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
            capturable=bool(group["capturable"]), differentiable=bool(group["differentiable"]), clip=clip,
            seed=int(group.get("seed", 0)), tensor_lr=isinstance(group["lr"], torch.Tensor),
        )

    def features(self) -> tuple[str, ...]:
        """The options beyond torch this partition needs (for the reasons auto gives)."""
        wanted = {
            "master_weights": self.master,
            "state_dtype": self.state_dtype != self.param_dtype,
            "stochastic_rounding": self.stochastic_rounding,
            "clip": self.clip,
        }
        return tuple(name for name, on in wanted.items() if on)


class Backend:
    """The interface (see the module docstring). Subclasses set `name` and override what they need."""

    name: str = ""

    def unavailable(self) -> str | None:
        return None

    def supports(self, part: Partition) -> str | None:
        raise NotImplementedError

    def prepare(self, part: Partition) -> None:
        pass

    def step(self, part: Partition, grads: list[torch.Tensor] | None, hp: Hyper, amp: Amp,
             checked: bool = False) -> bool:
        raise NotImplementedError

    def check(self, part: Partition, grads: list[torch.Tensor] | None, hp: Hyper, amp: Amp) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fused_adam backend {self.name!r}>"


_backends: dict[str, Backend | BaseException] = {}


def check_name(name: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {name!r}; expected 'auto' or one of {', '.join(BACKEND_NAMES)}")


def get(name: str) -> Backend:
    """The backend object, or raise the error that importing its module raised. Each module `backends/<name>.py`
    defines `BACKEND`, its instance."""
    check_name(name)
    if name not in _backends:
        try:
            _backends[name] = importlib.import_module(f"{__name__}.{name}").BACKEND
        except Exception as e:  # a broken optional backend must not break the package
            _backends[name] = e
    backend = _backends[name]
    if isinstance(backend, BaseException):
        raise backend
    return backend


def unavailable(name: str) -> str | None:
    """Why backend `name` cannot run in this process, or None."""
    try:
        backend = get(name)
    except Exception as e:
        return f"import failed: {type(e).__name__}: {e}"
    return backend.unavailable()


def available_backends() -> list[str]:
    """The backends that can run in this process (each may still decline some devices or dtypes)."""
    return [n for n in BACKEND_NAMES if unavailable(n) is None]


def candidates(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, ("reference",))
