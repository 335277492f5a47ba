"""state_dict and load_state_dict: torch's format, and a loader that checks everything before it changes anything.

torch's Optimizer.load_state_dict checks only the number of groups and of params per group; whatever else a damaged
or foreign checkpoint holds surfaces later, at a step, as a crash or as NaN in every param (a missing exp_avg_sq
re-created as zeros makes the next update about lr * m / eps). This loader runs torch's steps (pre-hooks, torch's two
checks with its messages, the id -> param mapping, the group update, __setstate__, post-hooks) and, between the
checks and the first write, validates every saved group and every saved param state, and builds the new state
aside. On an error (ValueError or TypeError naming the group, the param, the key, what was found and what was
expected) the optimizer is as it was.

What a valid state is, per param (the saved group's options decide what is required):
  * nothing, or an empty dict (a param that has not stepped), or
  * "step": a finite number >= 0, or a 1-element real Tensor holding one (torch accepts a number too);
    "exp_avg", "exp_avg_sq" and, with amsgrad, "max_exp_avg_sq": Tensors of the param's shape and a floating dtype
    (a complex param's: its own complex dtype), finite, the squares >= 0; "master_param" (master weights) may be
    absent: the step then makes it from the param. Entries beyond these are carried as torch carries them.
The stored dtypes are what the step uses: the moments in the partition's state dtype (PartOptions.of: the param's
dtype unless the group says otherwise), a master in fp32. torch's loader casts every floating state to the param's
dtype, which would round an fp32 master or fp32 moments of a bf16 param. What a step would refuse in their memory
is refused here (an expanded moment, one tensor for two entries or two params, a moment that is its param; torch's
loader takes them and its step raises or updates one tensor twice), and so is a meta tensor for a param with values.
A saved group without the options beyond torch (torch's checkpoints) keeps the optimizer's own (master_weights,
state_dtype, stochastic_rounding, seed), as torch keeps param_names. A loaded master is checked against its param
at the next step (NOTE [loaded masters] in optimizer.py).

optimizer.state may also hold entries that are not a param's (torch allows `optimizer.state["test"] = 1`); they go
into state_dict()["state"] under their own key and come back from load_state_dict as they were.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .args import EXTENSIONS, check_args, check_extensions, describe, short, storage_shortfall
from .backends import PartOptions
from .plan import check_apart, check_arrays_apart, check_memory

# Group keys torch.optim.Adam's __setstate__ fills in for checkpoints written before they existed.
GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "decoupled_weight_decay": False,
    "fused": None,
}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")
_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay", "master_weights",
          "stochastic_rounding")


def fill_group_defaults(param_groups: list[dict[str, Any]]) -> None:
    """What torch.optim.Adam.__setstate__ does to the groups of an older pickle or checkpoint (FusedAdam.__setstate__
    and this loader)."""
    for group in param_groups:
        for key, value in GROUP_DEFAULTS.items():
            group.setdefault(key, value)


def state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """torch's state_dict, each param's state a plain dict (loadable without fused_adam). Entries of
    optimizer.state that are not a param's state dict are kept as they are, as torch keeps them."""
    sd = Optimizer.state_dict(optimizer)
    sd["state"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in sd["state"].items()}
    return sd


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too, as float() takes them


def _readable(t: Tensor) -> bool:
    """Whether t's values can be read here (not on the meta device); a DTensor is checked on its local shard."""
    return t.device.type != "meta"


def _readable_value(x: Any) -> bool:
    """A number, or a Tensor whose value can be read here (a meta Tensor's cannot: it passes unread)."""
    return not isinstance(x, Tensor) or _readable(x)


def _local(t: Tensor) -> Tensor:
    local = getattr(t, "_local_tensor", None)  # DTensor: each rank checks its shard
    t = local if isinstance(local, Tensor) else t
    return torch.view_as_real(t) if t.is_complex() else t


def _check_group(gi: int, group: dict[str, Any], max_grad_norm: Any) -> None:
    """A saved group's hyperparameters: the types the step needs, then the constructor's own checks."""
    where = f"param group {gi}"
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key not in group:
            raise ValueError(f"{where}: missing '{key}'; a group needs lr, betas, eps and weight_decay")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(f"{where}: 'lr' is {describe(lr)}; expected a number or a 1-element floating Tensor")
    elif not _is_number(lr):
        raise TypeError(f"{where}: 'lr' is {describe(lr)}; expected a number or a 1-element floating Tensor")
    if _readable_value(lr) and not 0.0 <= float(lr) < math.inf:
        raise ValueError(f"{where}: 'lr' is {short.repr(lr)}; expected a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}: 'betas' is {describe(betas)}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if beta.numel() != 1 or not beta.is_floating_point():
                raise TypeError(f"{where}: 'betas'[{i}] is {describe(beta)}; expected a float or a 1-element floating "
                                "Tensor")
        elif not isinstance(beta, float):  # torch's constructor: both floats or both Tensors, no ints
            raise TypeError(f"{where}: 'betas'[{i}] is {describe(beta)}; expected a float in [0, 1) (or a Tensor)")
        if _readable_value(beta) and not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{where}: 'betas'[{i}] is {short.repr(beta)}; expected a value in [0, 1)")
    for key in ("eps", "weight_decay"):
        value = group[key]
        if not _is_number(value):
            raise TypeError(f"{where}: '{key}' is {describe(value)}; expected a finite number >= 0")
        if not 0.0 <= value < math.inf:
            raise ValueError(f"{where}: '{key}' is {value}; expected a finite number >= 0")
    for key in _FLAGS:
        if key in group and not isinstance(group[key], bool):
            raise TypeError(f"{where}: '{key}' is {describe(group[key])}; expected True or False")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"{where}: '{key}' is {describe(group[key])}; expected None, True or False")
    state_dtype = group.get("state_dtype", EXTENSIONS["state_dtype"])
    if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
        raise TypeError(f"{where}: 'state_dtype' is {describe(state_dtype)}; expected None or a torch.dtype")
    seed = group.get("seed", EXTENSIONS["seed"])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{where}: 'seed' is {describe(seed)}; expected an int in [0, 2**64)")
    try:  # the constructor's checks (ranges and combinations), worded as torch's
        check_args(lr, betas, group["eps"], group["weight_decay"], group["foreach"], group["capturable"],
                   group["fused"], group["differentiable"])
        check_extensions(group.get("master_weights", False), state_dtype, group.get("stochastic_rounding", False),
                         seed, max_grad_norm, group["differentiable"])
    except (ValueError, RuntimeError) as e:
        raise ValueError(
            f"{where}: {e} (lr={short.repr(lr)}, betas={short.repr(betas)}, eps={group['eps']!r}, "
            f"weight_decay={group['weight_decay']!r})"
        ) from e


def _check_tensor(where: str, key: str, value: Any, p: Tensor) -> None:
    expected_dtype = f"dtype {p.dtype}" if p.is_complex() else "a floating dtype"
    expected = f"a Tensor of the param's shape {tuple(p.shape)} and {expected_dtype}"
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: '{key}' is {describe(value)}; expected {expected}")
    if value.layout != torch.strided:
        raise TypeError(f"{where}: '{key}' is a {value.layout} Tensor; expected {expected}")
    if value.shape != p.shape:
        raise ValueError(f"{where}: '{key}' has shape {tuple(value.shape)}; expected {expected}")
    _check_meta(where, key, value, p)
    _check_storage(where, key, value)
    ok = value.dtype == p.dtype if p.is_complex() and key != "master_param" else value.is_floating_point()
    if not ok:
        raise TypeError(f"{where}: '{key}' has dtype {value.dtype}; expected {expected}")


def _check_meta(where: str, key: str, value: Tensor, p: Tensor) -> None:
    """A meta tensor has no values: a state of one for a param that has them cannot be loaded."""
    if value.is_meta and not p.is_meta:
        raise TypeError(f"{where}: '{key}' is a meta Tensor (no values); expected one with values, as its param has")


def _check_storage(where: str, key: str, value: Tensor) -> None:
    """Before a value is read or cast: its storage holds it (a freed one would be read out of bounds)."""
    lack = storage_shortfall(_local(value))
    if lack:
        raise ValueError(f"{where}: '{key}' needs {lack[0]} bytes of storage for its {value.numel()} elements, but "
                         f"its storage holds {lack[1]} (was the storage resized or freed under it?)")


def _check_values(where: str, key: str, t: Tensor) -> None:
    """After the cast to the stored dtype (a value that overflows it is as bad as a NaN)."""
    if not _readable(t):
        return
    values = _local(t)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{where}: '{key}' holds {bad} NaN or infinite values (as {t.dtype}); expected finite values")
    if key in _SQUARES and values.numel() and bool((values < 0).any()):
        raise ValueError(f"{where}: '{key}' holds negative values (min {float(values.min())}); expected values >= 0")


def _load_step(where: str, value: Any, p: Tensor, group: dict[str, Any]) -> Tensor:
    expected = "a finite number >= 0, or a 1-element real Tensor holding one"
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where}: 'step' is {describe(value)}; expected {expected}")
        _check_meta(where, "step", value, p)
        _check_storage(where, "step", value)
        number = float(value) if _readable(value) else 0.0
    elif _is_number(value):
        number = float(value)
    else:
        raise TypeError(f"{where}: 'step' is {describe(value)}; expected {expected}")
    if not 0.0 <= number < math.inf:
        raise ValueError(f"{where}: 'step' is {number}; expected {expected}")
    if not isinstance(value, Tensor):  # torch.optim.Adam.__setstate__: a number becomes a float32 tensor
        value = torch.tensor(number, dtype=torch.float32)
    if group["capturable"] or group["fused"]:  # torch's loader (NOTE [special device hosting for step])
        return value.to(dtype=torch.float32, device=p.device)
    return value


def _cast_other(value: Any, p: Tensor) -> Any:
    """An entry the step does not read, as torch's loader copies it: tensors on the param's device (floating ones in
    its dtype if it is floating), containers rebuilt."""
    if isinstance(value, Tensor):
        return value.to(dtype=p.dtype, device=p.device) if p.is_floating_point() else value.to(device=p.device)
    if isinstance(value, dict):
        return {k: _cast_other(v, p) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return type(value)(_cast_other(v, p) for v in value)
    return value


def _load_param_state(where: str, saved: Any, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """One param's saved state, checked and cast to what the step uses; nothing of the optimizer is touched."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where}: the state is {describe(saved)}; expected a dict")
    if not saved:
        return {}
    required = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
    for key in required:
        if key not in saved:
            raise ValueError(f"{where}: missing '{key}'; a saved state of a group whose 'amsgrad' is "
                             f"{group['amsgrad']} needs {', '.join(required)}, found {', '.join(map(str, saved))}")
    state_dtype = p.dtype if p.is_complex() else PartOptions.of(group, p.dtype, clip=False).state_dtype
    loaded: dict[str, Any] = {}
    for key, value in saved.items():
        if key == "step":
            loaded[key] = _load_step(where, value, p, group)
        elif key in MOMENTS or key == "master_param":
            _check_tensor(where, key, value, p)
            dtype = torch.float32 if key == "master_param" else state_dtype
            loaded[key] = value.to(device=p.device, dtype=dtype)
            _check_values(where, key, loaded[key])
        else:
            loaded[key] = _cast_other(value, p)
    return loaded


_ARRAYS = (("exp_avg", "exp_avgs"), ("exp_avg_sq", "exp_avg_sqs"), ("max_exp_avg_sq", "max_exp_avg_sqs"),
           ("master_param", "master_params"), ("step", "state_steps"))


def _check_apart(loaded: list[tuple[Tensor, dict[str, Any], str]]) -> None:
    """The memory of the loaded states, as a step checks it (plan.check_memory, check_apart, check_arrays_apart): no
    state written by a step with two elements at one address (an expanded moment), no two entries of a param in one
    memory (exp_avg saved as exp_avg_sq, a moment that is its param), none in another param's state (one moment or
    step tensor for two params). torch's loader takes them, then its step raises or updates one tensor twice; here
    the load raises, naming them, and nothing changes. loaded: (param, its loaded state, where), each param once."""
    who = "load_state_dict"
    empty = torch.empty(0)
    rows = {name: [] for _, name in _ARRAYS}
    try:
        for pos, (p, st, where) in enumerate(loaded):
            named = [("params", _local(p))]
            for key, name in _ARRAYS:
                t = st.get(key)
                t = _local(t) if isinstance(t, Tensor) and not t.is_meta else empty
                rows[name].append(t)
                if t.numel():
                    check_memory(who, name, pos, t, f"({where}, '{key}')")
                    named.append((name, t))
            check_apart(who, named, pos, f"({where})")
        check_arrays_apart(who, list(rows.items()), lambda pos: f"({loaded[pos][2]})")
    except RuntimeError as e:
        raise ValueError(str(e)) from None


@torch._disable_dynamo
def load_state_dict(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """torch's Optimizer.load_state_dict, with every saved group and param state checked (and the new state built)
    before the optimizer is changed; see the module docstring."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict is {describe(state_dict)}; expected a dict with 'state' and 'param_groups'")
    state_dict = dict(state_dict)  # shallow copy, as torch's (the pre-hooks may change it)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    for key, kind, expected in (("state", Mapping, "a dict"), ("param_groups", (list, tuple), "a list")):
        if not isinstance(state_dict.get(key), kind):
            raise TypeError(f"state_dict['{key}'] is {describe(state_dict.get(key))}; expected {expected}")
    groups = optimizer.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    for gi, group in enumerate(saved_groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
            raise TypeError(f"param group {gi} of the state_dict is {describe(group)}; expected a dict with a 'params' "
                            "list")
    # torch's checks, with its messages
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )

    max_grad_norm = getattr(optimizer, "max_grad_norm", None)
    fill_group_defaults(saved_groups)
    for group, saved in zip(groups, saved_groups):
        for key in EXTENSIONS:  # a checkpoint without them (torch's) keeps the options the optimizer was made with
            if key in group and key not in saved:
                saved[key] = group[key]
    for gi, group in enumerate(saved_groups):
        _check_group(gi, group, max_grad_norm)
    # saved id -> (param, its saved group, where): the first occurrence of a param listed twice
    owner: dict[Any, tuple[Tensor, dict[str, Any], str]] = {}
    listed: dict[Any, str] = {}  # saved id -> where it is first listed
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        for i, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            where = listed.setdefault(pid, f"param group {gi}, param {i}")
            first = owner.setdefault(pid, (p, saved, f"{where} (state_dict['state'][{pid!r}])"))
            if first[0] is not p:  # one saved state for two params: one of them would lose its own
                raise ValueError(f"loaded state dict lists id {pid!r} for two different params: {where} and "
                                 f"param group {gi}, param {i}")
    state: defaultdict[Any, Any] = defaultdict(dict)
    loaded: dict[int, tuple[Tensor, dict[str, Any], str]] = {}
    for pid, saved in state_dict["state"].items():
        if pid in owner:
            p, group, where = owner[pid]
            state[p] = _load_param_state(where, saved, p, group)
            if state[p]:
                loaded[id(p)] = (p, state[p], where)
        else:
            state[pid] = saved  # not a param's: kept as it is, as torch does
    _check_apart(list(loaded.values()))

    def update_group(group: dict[str, Any], new_group: dict[str, Any]) -> dict[str, Any]:
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in new_group:
            new_group["param_names"] = group["param_names"]
        return new_group

    param_groups = [update_group(g, s) for g, s in zip(groups, saved_groups)]
    optimizer.__setstate__({"state": state, "param_groups": param_groups})
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)
