"""Argument checks: torch.optim.Adam's (its exception types and messages, so that code written against torch keeps
working) and those of the options beyond torch. The constructor and load_state_dict both use them."""
from __future__ import annotations

import functools
import numbers
import os
import reprlib
import sys
import warnings

import torch
from torch import Tensor

try:
    from torch.optim.optimizer import _device_dtype_check_for_fused as _torch_fused_check
except ImportError:  # another torch: the same rule, spelled here
    _torch_fused_check = None

# Options beyond torch's (README "Beyond torch"). They appear in param_groups only when set, so that a FusedAdam used
# as a plain drop-in has exactly torch's param_groups and state_dict.
EXTENSIONS = {"master_weights": False, "state_dtype": None, "stochastic_rounding": False, "seed": 0}
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_extensions(master_weights, state_dtype, stochastic_rounding, seed, max_grad_norm, differentiable) -> None:
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected None (the param's dtype) or one of "
                         f"{STATE_DTYPES}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed!r}; expected an int in [0, 2**64)")
    for name, flag in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(flag, bool):
            raise ValueError(f"Invalid {name}: {flag!r}; expected True or False")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, numbers.Real) and not isinstance(max_grad_norm, bool)
                                          and 0.0 < max_grad_norm < float("inf")):
        raise ValueError(f"Invalid max_grad_norm value: {describe(max_grad_norm)}; expected None or a finite number > 0 "
                         "(a Python or NumPy number)")
    used = [n for n, v in (("master_weights", master_weights), ("state_dtype", state_dtype is not None),
                           ("stochastic_rounding", stochastic_rounding), ("max_grad_norm", max_grad_norm is not None)) if v]
    if differentiable and used:
        raise ValueError(f"differentiable=True does not support {', '.join(used)}")


def check_args(lr, betas, eps, weight_decay, foreach, capturable, fused, differentiable) -> None:
    """torch.optim.Adam's checks, with its exception types and messages."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    for i in (0, 1):  # before the range checks, which cannot compare a multi-element tensor
        if isinstance(betas[i], Tensor) and betas[i].numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
    for name, value in (("lr", lr), ("betas[0]", betas[0]), ("betas[1]", betas[1])):  # (the range checks read it)
        if isinstance(value, Tensor) and not _has_value(value):
            raise ValueError(f"Tensor {name} ({describe(value)} on {value.device}) has no value to read (a meta "
                             "tensor, or its storage freed)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        if isinstance(betas[i], Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


short = reprlib.Repr()  # values in error messages: cut to a line
short.maxstring = short.maxother = 40


def describe(value) -> str:
    """A value as an error message names what it found."""
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{short.repr(value)} ({type(value).__name__})"


_NUMBERS = frozenset((float, int))


def _in_range(value, lo: float, hi: float | None) -> bool:
    """A number in [lo, hi) (NaN is not), or a one-element real tensor (its value is not read: that would be a
    device sync, and under CUDA graph capture an error)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and _has_value(value)
    if not isinstance(value, numbers.Real):  # (numpy's floats too, as a scheduler may write them)
        return False
    return lo <= value if hi is None else lo <= value < hi


def check_hyper(group_index: int, lr, betas, eps, weight_decay) -> tuple:
    """A group's hyperparameters as a step reads them: the constructor's ranges (torch's), because param_groups
    entries may be changed after construction (a scheduler, or by hand) and a step on a string, a NaN or a beta of
    1.5 would fail halfway or write NaNs. ValueError naming the entry and its value, before any group is stepped.
    Returns the two betas (`betas` is whatever unpacks into two, as torch's step takes it)."""
    where = f"FusedAdam: param_groups[{group_index}]"
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}['betas'] is {betas!r}; expected two numbers in [0, 1) or two one-element "
                         "tensors") from None
    # (The common case, floats or a Tensor lr, in exact type tests first: this runs every step, for every group.)
    if (type(eps) in _NUMBERS and type(weight_decay) in _NUMBERS and 0.0 <= eps and 0.0 <= weight_decay
            and (0.0 <= lr if type(lr) in _NUMBERS else _in_range(lr, 0.0, None))
            and (0.0 <= b1 < 1.0 if type(b1) in _NUMBERS else _in_range(b1, 0.0, 1.0))
            and (0.0 <= b2 < 1.0 if type(b2) in _NUMBERS else _in_range(b2, 0.0, 1.0))):
        return b1, b2
    for name, value, hi in (("['lr']", lr, None), ("['betas'][0]", b1, 1.0), ("['betas'][1]", b2, 1.0)):
        if not _in_range(value, 0.0, hi):
            want = "a number >= 0" if hi is None else "a number in [0, 1)"
            if isinstance(value, Tensor):  # (its repr would read a freed storage)
                lacks = "" if value.numel() != 1 or value.is_complex() else (
                    " with no value to read (a meta tensor, or its storage freed)")
                raise ValueError(f"{where}{name} is {describe(value)} on {value.device}{lacks}; expected {want} or "
                                 "a one-element real tensor")
            raise ValueError(f"{where}{name} is {value!r}; expected {want} or a one-element tensor")
    for name, value in (("['eps']", eps), ("['weight_decay']", weight_decay)):
        if isinstance(value, Tensor) or not _in_range(value, 0.0, None):
            raise ValueError(f"{where}{name} is {value!r}; expected a number >= 0")
    return b1, b2


_DEFAULT_EXTENSIONS = tuple(EXTENSIONS.values())
_EXTENSION_KEYS = frozenset(EXTENSIONS)


def check_group_extensions(group_index: int, group: dict, max_grad_norm) -> None:
    """The options beyond torch as a step reads them from a param group (set by hand or by add_param_group after
    construction): the constructor's checks, before any group is stepped or has states made (a state_dtype of int32
    would cast the moments to integers)."""
    if max_grad_norm is None and _EXTENSION_KEYS.isdisjoint(group):  # (every step: the common case first)
        return
    values = tuple(group.get(k, v) for k, v in EXTENSIONS.items())
    if values == _DEFAULT_EXTENSIONS and max_grad_norm is None:
        return
    try:
        check_extensions(*values, max_grad_norm, group["differentiable"])
    except ValueError as e:
        raise ValueError(f"FusedAdam: param_groups[{group_index}]: {e}") from None


def storage_shortfall(t: Tensor) -> tuple[int, int] | None:
    """(the bytes t's elements need, the bytes its storage holds) where the storage is too small for them (resized
    or freed under t, as FSDP frees params with `untyped_storage().resize_(0)`: torch's kernels would read and
    write out of bounds), else None. An empty or meta tensor has nothing to read."""
    if t.numel() == 0 or t.is_meta:
        return None
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    need, have = (last + 1) * t.element_size(), t.untyped_storage().nbytes()
    return (need, have) if need > have else None


def storage_error(what: str, t: Tensor, lack: tuple[int, int]) -> RuntimeError:
    """The error for `what` (a tensor named as its check names it), whose storage_shortfall is `lack`."""
    need, have = lack
    return RuntimeError(f"{what} needs {need} bytes of storage for its {t.numel()} elements, but its storage holds "
                        f"{have} (was the storage resized or freed under it?)")


def sparse_grad_error(param_index: int, group_index: int) -> RuntimeError:
    """torch's words for a sparse grad (its Adam raises them), naming the param."""
    return RuntimeError(f"FusedAdam does not support sparse gradients (grad of param {param_index} in group "
                        f"{group_index} is sparse), please consider torch.optim.SparseAdam instead")


def _first_unreadable_py(tensors: list) -> int:
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and type(t) not in (Tensor, torch.nn.Parameter):
            continue  # a subclass (DTensor) may hold no memory of its own: its local tensor is checked by the step
        if t is not None and (not isinstance(t, Tensor) or t.layout != torch.strided
                              or not (t.is_floating_point() or t.is_complex()) or storage_shortfall(t)):
            return i
    return -1


@functools.lru_cache(maxsize=None)
def _first_unreadable():
    try:
        from ._C import first_unreadable  # ~10 ns a tensor
    except Exception:  # built without the extension
        return _first_unreadable_py
    return first_unreadable


def check_readable(group_grads: list[list]) -> None:
    """Every grad a norm pass reads (max_grad_norm: before the per-tensor checks of the step) is None or a strided
    floating-point or complex tensor whose storage holds its elements: else an error naming it, as the step would
    word it (torch's norm would read a freed storage out of bounds, or fail naming no param)."""
    for gi, grads in enumerate(group_grads):
        i = _first_unreadable()(grads)
        if i < 0:
            continue
        g = grads[i]
        where = f"grad of param {i} in group {gi}"
        if not isinstance(g, Tensor):
            raise TypeError(f"FusedAdam: the {where} is {describe(g)}; expected a Tensor or None")
        if g.layout != torch.strided:
            raise sparse_grad_error(i, gi)
        if not (g.is_floating_point() or g.is_complex()):
            raise RuntimeError(f"FusedAdam: the {where} has dtype {g.dtype}; expected a floating-point or complex grad")
        raise storage_error(f"FusedAdam: the {where}", g, storage_shortfall(g) or (g.numel() * g.element_size(), 0))


def _has_value(t: Tensor) -> bool:
    """A tensor whose values a backend can read (torch's ops and the kernels do not check: a meta tensor has none, a
    freed storage is read out of bounds)."""
    return not t.is_meta and storage_shortfall(t) is None


def check_amp(name: str, t) -> None:
    """grad_scale and found_inf as a step takes them (torch.amp.GradScaler's: one-element real tensors), checked once
    before any group is stepped: a multi-element scale would divide element-wise on one backend and be read as its
    first element on another, a freed one read out of bounds."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"FusedAdam: {name} must be a Tensor or None, got {describe(t)}")
    if t.numel() != 1 or t.is_complex() or not (t.is_floating_point() or t.dtype == torch.bool):
        raise ValueError(f"FusedAdam: {name} must be a one-element real tensor, got {describe(t)}")
    if not _has_value(t):
        raise ValueError(f"FusedAdam: {name} ({describe(t)} on {t.device}) has no value to read (a meta tensor, or "
                         "its storage freed)")


def check_fused_param(p: Tensor) -> None:
    """fused=True asks for torch's fused kernel, which rejects params that are not floating point or live on a device
    it has no kernel for (meta, for one), when their state is created. We raise the same error at the same moment,
    so that code written against torch.optim.Adam(fused=True) fails the same way, although our kernels would run
    complex params (the default, fused=None, runs them)."""
    if _torch_fused_check is not None:
        _torch_fused_check(p)
    elif not (p.device.type in ("cpu", "cuda") and torch.is_floating_point(p)):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices: "
                           f"['cpu', 'cuda'] but {p.dtype} and {p.device.type}")


_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def warn(message: str) -> None:
    """A warning that points at the caller's line (its opt.step(), scaler.step() or flatten_parameters()), not at
    this package's or torch's."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith((_HERE, _TORCH)):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"fused_adam: {message}", stacklevel=level)
