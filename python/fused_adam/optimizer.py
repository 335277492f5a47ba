"""FusedAdam / FusedAdamW: drop-in torch.optim.Adam / AdamW whose step runs on a fused backend.

This file owns everything that is not arithmetic: argument checks (torch's wording), param groups, lazy state
in torch's layout, AMP plumbing, and dispatch of each (device, dtype) partition of a group to a backend.

NOTE [backend step contract]: see fused_adam/backends/__init__.py. The optimizer guarantees a backend gets one
device and one real dtype per call (complex params arrive as view_as_real views, DTensor params as their local
shards, whose states are DTensors with the param's placement as torch's are), float32 0-dim step tensors
(on the param's device when capturable, else on the CPU), and grads that are neither None nor sparse.

NOTE [step plan]: building the per-group lists (params with grads, their states, partitions, chosen backends)
is the per-parameter Python work that dominates torch's step() for many small tensors. It is done once and
cached in a _Plan. A step then only reads the grads ([p.grad for p in params], or the cpu kernel reads them
itself: READS_GRADS in backends/__init__.py) and checks that nothing the plan depends on has changed: the group's params list, which params have grads, the options that change state or
backend choice, and the state tensors (the per-parameter state dicts are _State objects that bump a generation
counter whenever a tensor in them is replaced; load_state_dict and add_param_group drop every plan). Each
partition of a plan carries a `cache` dict that its backend may fill with what it prepares from the lists (the
cpu backend: the lists converted to C++ once, NOTE [cpu partition] in csrc/ops.cpp); it goes with the plan.

NOTE [packed states]: the states a plan creates for small params (exp_avg, exp_avg_sq, max_exp_avg_sq, the fp32
master; params of at most 64K elements) are 64-byte-aligned views into shared buffers of up to 1M elements per
state kind, instead of one allocation per param, and their step counts are 0-dim views into one float32 buffer.
The values, shapes, strides and state_dict are torch's; what changes is where they live: a step over many small
tensors then walks long arrays instead of thousands of separate pages (10,000 tensors of 1,000 fp32 elements, one thread, the roofline pass alone: 12.3 ms with
per-param states, 10.0 ms packed, 8.2 ms with params and grads packed too). The buffers are bounded because
torch.save of one view writes its whole buffer (a checkpoint of the whole state_dict writes each buffer once;
saving state tensors one by one writes up to 4 MB each: clone them first). Large params gain nothing from it and
params that need a view (complex, DTensor) or are not contiguous get states of their own, as torch makes them;
so do states that already exist (e.g. loaded from a torch checkpoint).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from itertools import chain
from operator import attrgetter
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .backends import Hyper

log = logging.getLogger("fused_adam")


@dataclass(frozen=True)
class Dispatch:
    """Which backend ran one (device, dtype) partition of a param group, and why the others did not."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)
    num_params: int = 0


class _State(dict):
    """A parameter's state. Replacing or removing a tensor in it invalidates every cached step plan."""

    generation = 0

    def _bump(self) -> None:
        _State.generation += 1

    def __setitem__(self, key, value):
        _State.generation += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _State.generation += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        _State.generation += 1
        super().update(*args, **kwargs)

    def pop(self, *args):
        _State.generation += 1
        return super().pop(*args)

    def clear(self):
        _State.generation += 1
        super().clear()

    def setdefault(self, key, default=None):
        _State.generation += 1
        return super().setdefault(key, default)

    def __reduce__(self):  # pickles as a plain dict's contents; unpickles as a _State
        return (_State, (dict(self),))


@dataclass
class _Part:
    device: torch.device
    dtype: torch.dtype
    backend: Any  # the backend module
    dispatch: Dispatch
    index: list[int] | None  # positions in the group's params; None: all of them, in order
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]
    view_pos: list[int]  # positions in this part whose grads need _kernel_view (complex or DTensor params)
    master_params: list[Tensor]  # fp32 masters (master_weights), else empty
    tensor_ids: list[int]  # each param's index over all groups (stochastic rounding's stream id)
    cache: dict = field(default_factory=dict)  # the backend's, for the life of this plan (NOTE [step plan])


@dataclass
class _Plan:
    params: list[Tensor]  # the group's params list object this plan was built from
    num_params: int
    has_grad: list[bool]
    key: tuple
    generation: int
    parts: list[_Part]
    reads_grads: bool = False  # one partition of every param, on a READS_GRADS backend (NOTE [step plan])


# Options beyond torch's (see README "Beyond torch"). They appear in param_groups only when set, so that a
# FusedAdam used as a plain drop-in has exactly torch's param_groups and state_dict.
EXTENSIONS = {"master_weights": False, "state_dtype": None, "stochastic_rounding": False, "seed": 0}
_EXTENSION_ITEMS = tuple(EXTENSIONS.items())
_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# NOTE [packed states]: which params get packed states, and into how large buffers (elements).
_PACK_MAX_NUMEL = 1 << 16
_PACK_BUFFER = 1 << 20


def _check_extensions(master_weights, state_dtype, stochastic_rounding, seed, max_grad_norm, differentiable) -> None:
    if state_dtype is not None and state_dtype not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype}; expected None (the param's dtype) or one of {_STATE_DTYPES}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed!r}; expected an int in [0, 2**64)")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0.0 < max_grad_norm < float("inf")):
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}; expected None or a finite number > 0")
    used = [n for n, v in (("master_weights", master_weights), ("state_dtype", state_dtype is not None),
                           ("stochastic_rounding", stochastic_rounding), ("max_grad_norm", max_grad_norm is not None)) if v]
    if differentiable and used:
        raise ValueError(f"differentiable=True does not support {', '.join(used)}")


def _check_args(lr, betas, eps, weight_decay, foreach, capturable, fused, differentiable) -> None:
    """torch.optim.Adam's checks, with its exception types and messages."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    for i in (0, 1):  # before the range checks, which cannot compare a multi-element tensor
        if isinstance(betas[i], Tensor) and betas[i].numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
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


try:
    from torch.distributed.tensor import DTensor
except Exception:  # torch built without distributed
    DTensor = ()  # isinstance(x, ()) is False


def _needs_view(t: Tensor) -> bool:
    return isinstance(t, DTensor) or t.is_complex()


def _kernel_view(t: Tensor) -> Tensor:
    """What a backend sees of a tensor: a DTensor's local shard, a complex tensor's view_as_real. Both are views
    of the same storage, so the backend's in-place updates land in the optimizer's tensors."""
    if isinstance(t, DTensor):
        t = t._local_tensor
    return torch.view_as_real(t) if t.is_complex() else t


_IS_SPARSE = attrgetter("is_sparse")
_PLAIN = (Tensor, torch.nn.Parameter)  # types whose .grad the kernel can read itself (no grad property of their own)


def _scalar(x):
    """torch's _to_scalar: a 1-element Tensor hyperparameter becomes 0-dim; a number stays a number."""
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


try:  # the pieces of torch's step wrapper (NOTE [step wrapper])
    from torch._C._profiler import _RecordFunctionFast
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # another torch: its own wrapper applies
    _RecordFunctionFast = None


def _hooked_step(step: Callable) -> Callable:
    """NOTE [step wrapper]: torch's Optimizer wraps each subclass's step() (Optimizer.profile_hook_step): a
    profiler label "Optimizer.step#<class>.step", the step pre-hooks (which may replace the arguments), the step,
    `_optimizer_step_code()` (the profiler's Python-tracing entry point) and the post-hooks. Its label is
    torch.autograd.profiler.record_function, ~4.8 us a call: a third of a small step's fixed cost, paid by torch's
    fused Adam too. This wrapper does the same with _RecordFunctionFast (~0.2 us, the same user-scope event in a
    profile), and torch leaves a step marked `hooked` as it is. A subclass that overrides step() gets torch's
    wrapper as usual; this one then only calls through, so that the hooks run once."""
    if _RecordFunctionFast is None:
        return step

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if type(self).step is not wrapper:
            return step(*args, **kwargs)
        with _RecordFunctionFast(f"Optimizer.step#{type(self).__name__}.step"):
            for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
                    args, kwargs = result
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
            return out

    wrapper.hooked = True
    return wrapper


class FusedAdam(Optimizer):
    """Adam with a fused step. Same arguments, defaults, errors and state_dict as torch.optim.Adam, plus
    `backend`: "auto" (the fastest backend that can run each (device, dtype) partition), or one of
    "cpu", "cuda", "triton", "reference", which then runs or raises.

    `foreach` and `fused` are accepted for drop-in compatibility (and validated as torch does); every backend
    is a one-pass multi-tensor step. After a step, `dispatch` tells which backend ran each partition of each
    group and why the others were skipped.

    Beyond torch (per group, except max_grad_norm):
      master_weights: bf16/fp16 params keep an fp32 copy in state["master_param"]; the update runs on it and
          the param gets it rounded to nearest.
      state_dtype: dtype of exp_avg/exp_avg_sq/max_exp_avg_sq (default: the param's, as torch). fp32 math,
          one rounding per store; state_dict() stays loadable by torch.optim.Adam.
      stochastic_rounding, seed: bf16 stores that are the only copy of a value (params without a master,
          states) round stochastically, with bits drawn from (seed, step, param index, element index):
          unbiased, and a resumed run is bitwise the uninterrupted one.
      max_grad_norm: clip grads by their global L2 norm over all groups (torch.nn.utils.clip_grad_norm_'s
          coefficient), applied inside the Adam pass; the norm is `grad_norm` after the step. The grads
          themselves are left as they are (unscaled under AMP, not clipped).
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step() instead of unscaling

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_args(lr, betas, eps, weight_decay, foreach, capturable, fused, differentiable)
        _check_extensions(master_weights, state_dtype, stochastic_rounding, seed, max_grad_norm, differentiable)
        backends.check_name(backend)
        if backend != "auto":
            reason = backends.unavailable(backend)
            if reason is not None:
                raise RuntimeError(
                    f"FusedAdam: backend={backend!r} is unavailable: {reason}. "
                    f"Available backends: {', '.join(backends.available_backends())} (or backend='auto')"
                )
        self._backend = backend
        self._plans: dict[int, _Plan] = {}
        self.max_grad_norm = max_grad_norm
        self.grad_norm: Tensor | None = None
        defaults = dict(
            lr=lr,
            betas=tuple(map(_scalar, betas)),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        chosen = dict(master_weights=master_weights, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, seed=seed)
        defaults.update({k: v for k, v in chosen.items() if v != EXTENSIONS[k]})
        super().__init__(params, defaults)

    # ---- pickling, state_dict ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend asked for: "auto" or a backend name."""
        return self._backend

    def __getstate__(self):
        state = super().__getstate__()
        state["_backend"] = self._backend
        state["max_grad_norm"] = self.max_grad_norm
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", "auto")
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("grad_norm", None)
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)
        for p, s in list(self.state.items()):
            if not isinstance(s, _State):
                self.state[p] = _State(s)
        _State.generation += 1

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # plain dicts: loadable anywhere
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that fp32 masters and states kept in a state_dtype are not cast to the param's dtype
        on the way in (torch's loader casts every floating-point state to it, which would round the master)."""
        keep = {
            pid: {k: v for k, v in s.items() if k == "master_param" or (k in _STATE_KEYS and torch.is_tensor(v))}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for pid, p, group in zip(saved_ids, params, groups):
            for key, value in keep.get(pid, {}).items():
                if key == "master_param":
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                elif group.get("state_dtype") is not None:
                    self.state[p][key] = value.to(device=p.device, dtype=group["state_dtype"], copy=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.__dict__.get("_plans", {}).clear()

    @property
    def dispatch(self) -> list[list[Dispatch]]:
        """Per param group, the backend that ran each (device, dtype) partition in the last step, and why the
        backends before it in auto's order were skipped. Empty for a group that has not stepped."""
        return [
            [part.dispatch for part in self._plans[i].parts] if i in self._plans else []
            for i in range(len(self.param_groups))
        ]

    # ---- the step ------------------------------------------------------------------------------------------

    def _hyper(self, group: dict[str, Any]) -> Hyper:
        beta1, beta2 = group["betas"]
        return Hyper(
            lr=_scalar(group["lr"]),
            beta1=_scalar(beta1),
            beta2=_scalar(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            decoupled=group["decoupled_weight_decay"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            master_weights=group.get("master_weights", False),
            state_dtype=group.get("state_dtype"),
            stochastic_rounding=group.get("stochastic_rounding", False),
            seed=group.get("seed", 0),
            clip=self.max_grad_norm is not None,
        )

    @staticmethod
    def _part_hyper(hp: Hyper, dtype: torch.dtype) -> Hyper:
        """The options as one (device, dtype) partition needs them: features that change nothing for this dtype
        are off, so that a backend without them can still run it."""
        master = hp.master_weights and dtype in _LOW_PRECISION
        state_dtype = hp.state_dtype if hp.state_dtype not in (None, dtype) else None
        narrow_only_copy = (dtype == torch.bfloat16 and not master) or (state_dtype or dtype) == torch.bfloat16
        sr = hp.stochastic_rounding and narrow_only_copy
        if (master, state_dtype, sr) == (hp.master_weights, hp.state_dtype, hp.stochastic_rounding):
            return hp  # the usual case; replace() would cost ~7 us of a ~20 us step
        return replace(hp, master_weights=master, state_dtype=state_dtype, stochastic_rounding=sr)

    @torch.no_grad()
    def _packed_states(self, group: dict[str, Any], params: list[Tensor]) -> list[dict[str, Tensor]]:
        """Zeroed states, step counts and master slots for the small params that have no state yet, as views into
        shared buffers of at most _PACK_BUFFER elements per state kind (NOTE [packed states]); per param, the
        views _param_state will use."""
        fresh = [p for p in params if not self.state.get(p) and p.numel() <= _PACK_MAX_NUMEL and p.is_contiguous()
                 and not _needs_view(p)]
        views: list[dict[str, Tensor]] = [{} for _ in params]
        where = {id(p): i for i, p in enumerate(params)}
        state_dtype = group.get("state_dtype") or (fresh[0].dtype if fresh else None)
        kinds = {key: state_dtype for key in _STATE_KEYS if key != "max_exp_avg_sq" or group["amsgrad"]}
        if fresh and group.get("master_weights", False) and fresh[0].dtype in _LOW_PRECISION:
            kinds["master_param"] = torch.float32
        bucket: list[Tensor] = []
        filled = 0
        for p in fresh + [None]:  # None closes the last bucket
            if bucket and (p is None or filled + p.numel() > _PACK_BUFFER):
                for key, dtype in kinds.items() if len(bucket) > 1 else ():
                    align = 64 // dtype.itemsize
                    sizes = [-(-q.numel() // align) * align for q in bucket]
                    buffer = torch.zeros(sum(sizes), dtype=dtype, device=bucket[0].device)
                    for q, slot in zip(bucket, buffer.split(sizes)):
                        views[where[id(q)]][key] = slot[: q.numel()].view(q.shape)
                if len(bucket) > 1:
                    steps = torch.zeros(len(bucket), dtype=torch.float32, device=bucket[0].device if group["capturable"] else "cpu")
                    for j, q in enumerate(bucket):
                        views[where[id(q)]]["step"] = steps[j]
                bucket, filled = [], 0
            if p is not None:
                bucket.append(p)
                filled += p.numel()
        return views

    def _param_state(self, p: Tensor, group: dict[str, Any], packed: dict[str, Tensor] | None = None) -> _State:
        """p's state, created (lazily, as torch does) or brought to what the group's options need. `packed`:
        zeroed views to create missing states in (NOTE [packed states])."""
        state = self.state[p]
        if not isinstance(state, _State):
            state = self.state[p] = _State(state)
        if "step" not in state:
            if packed and "step" in packed:
                state["step"] = packed["step"]
            else:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["capturable"] else "cpu")
        state_dtype = group.get("state_dtype") or p.dtype
        for key in _STATE_KEYS:
            if key == "max_exp_avg_sq" and not group["amsgrad"]:
                continue
            if key not in state:
                if packed and key in packed:
                    state[key] = packed[key]
                else:
                    state[key] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            elif state[key].dtype != state_dtype:
                state[key] = state[key].to(state_dtype)
        if group.get("master_weights", False) and p.dtype in _LOW_PRECISION and "master_param" not in state:
            if packed and "master_param" in packed:
                state["master_param"] = packed["master_param"].copy_(p.detach())
            else:
                state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        step = state["step"]
        step_device = p.device if group["capturable"] else torch.device("cpu")
        if not torch.is_tensor(step) or step.dtype != torch.float32 or step.device != step_device or step.dim():
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=step_device)
        return state

    def _choose_backend(self, group_index: int, device: torch.device, dtype: torch.dtype, hp: Hyper, n: int):
        skipped: dict[str, str] = {}
        names = backends.candidates(device) if self._backend == "auto" else (self._backend,)
        for name in names:
            reason = backends.unavailable(name)
            if reason is None:
                reason = backends.get(name).unsupported(device, dtype, hp) or backends.missing_features(backends.get(name), hp)
            if reason is None:
                log.debug("group %d, %s %s: backend %s (skipped: %s)", group_index, device, dtype, name, skipped)
                return backends.get(name), Dispatch(device, dtype, name, skipped, n)
            skipped[name] = reason
        if self._backend != "auto":
            raise RuntimeError(
                f"FusedAdam: backend={self._backend!r} cannot run param group {group_index} "
                f"(params of dtype {dtype} on {device}): {skipped[self._backend]}. "
                f"Available backends: {', '.join(backends.available_backends())} (or backend='auto')"
            )
        raise RuntimeError(f"FusedAdam: no backend can run {dtype} params on {device}: {skipped}")  # unreachable: reference runs anywhere

    def _plan_key(self, group: dict[str, Any]) -> tuple:
        get = group.get
        return (group["amsgrad"], group["capturable"], group["differentiable"], isinstance(group["lr"], Tensor),
                self.max_grad_norm is not None, *[get(k, v) for k, v in _EXTENSION_ITEMS])

    def _build_plan(self, gi: int, group: dict[str, Any], has_grad: list[bool], hp: Hyper) -> _Plan:
        params = group["params"]
        by_key: dict[tuple, list[int]] = {}
        # A param listed twice in a group (torch warns: "duplicate parameters") is updated twice, one after the
        # other, as torch's for-loop does: its k-th occurrence goes to a partition of its own, stepped after the
        # (k-1)-th. In one call the kernel's threads could run both updates at once on the same memory.
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if has_grad[i]:
                view = _kernel_view(p)
                occurrence = seen[id(p)] = seen.get(id(p), -1) + 1
                by_key.setdefault((view.device, view.dtype, occurrence), []).append(i)
        parts = []
        first_id = sum(len(g["params"]) for g in self.param_groups[:gi])  # params' index over all groups
        for (device, dtype, _), index in by_key.items():
            part_hp = self._part_hyper(hp, dtype)
            mod, dispatch = self._choose_backend(gi, device, dtype, part_hp, len(index))
            lists: dict[str, list[Tensor]] = {k: [] for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params")}
            view_pos = []
            packed = self._packed_states(group, [params[i] for i in index])
            for pos, i in enumerate(index):
                p = params[i]
                state = self._param_state(p, group, packed[pos])
                if _needs_view(p):
                    view_pos.append(pos)
                lists["params"].append(_kernel_view(p))
                lists["exp_avgs"].append(_kernel_view(state["exp_avg"]))
                lists["exp_avg_sqs"].append(_kernel_view(state["exp_avg_sq"]))
                if group["amsgrad"]:
                    lists["max_exp_avg_sqs"].append(_kernel_view(state["max_exp_avg_sq"]))
                lists["state_steps"].append(state["step"])
                if part_hp.master_weights:
                    lists["master_params"].append(_kernel_view(state["master_param"]))
            everything = len(by_key) == 1 and len(index) == len(params)
            tensor_ids = [first_id + i for i in index]
            parts.append(_Part(device, dtype, mod, dispatch, None if everything else index, view_pos=view_pos, tensor_ids=tensor_ids, **lists))
        reads_grads = (
            len(parts) == 1 and parts[0].index is None and not parts[0].view_pos
            and getattr(parts[0].backend, "READS_GRADS", False) and all(type(p) in _PLAIN for p in params)
        )
        return _Plan(params, len(params), has_grad, self._plan_key(group), _State.generation, parts, reads_grads)

    @torch.no_grad()
    def _clip_coef(self, group_grads: list[list[Tensor | None]], grad_scale: Tensor | None) -> Tensor | None:
        """torch.nn.utils.clip_grad_norm_'s coefficient over every grad of the optimizer, as a tensor (no host
        synchronisation): one multi-tensor norm pass reads the grads; the Adam pass applies the coefficient."""
        if self.max_grad_norm is None:
            return None
        grads = [g for grads in group_grads for g in grads if g is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the shards' partial norms, reduced
        if grad_scale is not None:
            total = total / grad_scale.to(total.device)  # the norm of the unscaled grads
        self.grad_norm = total
        return torch.clamp(self.max_grad_norm / (total.float() + 1e-6), max=1.0)

    def _check_grads(self, gi: int, part: _Part, grads: list[Tensor]) -> None:
        if not any(map(_IS_SPARSE, grads)):  # the per-step check, in C: ~35 ns a grad
            return
        for pos, g in enumerate(grads):
            if g.is_sparse:
                i = part.index[pos] if part.index is not None else pos
                raise RuntimeError(
                    f"FusedAdam does not support sparse gradients (grad of param {i} in group {gi} is sparse), "
                    "please consider torch.optim.SparseAdam instead"
                )

    def _step_part(self, gi: int, part: _Part, grads: list[Tensor] | None, hp: Hyper, grad_scale: Tensor | None,
                   found_inf: Tensor | None, clip_coef: Tensor | None, on: Callable) -> bool | None:
        """One partition's backend step. grads=None: a READS_GRADS backend reads them (and returns whether it
        stepped)."""
        # A backend that REJECTS_SPARSE checks every grad's layout before it changes anything: the Python scan
        # (~60 ns a grad) then runs only to word its error as torch does.
        checked = getattr(part.backend, "REJECTS_SPARSE", False) and not part.view_pos
        if grads is not None and not checked:
            self._check_grads(gi, part, grads)
        if part.view_pos:
            grads = list(grads)
            for pos in part.view_pos:
                grads[pos] = _kernel_view(grads[pos])
        part_hp = self._part_hyper(hp, part.dtype)
        extra: dict[str, Any] = {}
        if part_hp.master_weights:
            extra["master_params"] = part.master_params
        if part_hp.stochastic_rounding:
            extra["tensor_ids"] = part.tensor_ids
        if clip_coef is not None:
            extra["clip_coef"] = on(part.device, clip_coef)
        if getattr(part.backend, "USES_CACHE", False):
            extra["cache"] = part.cache
        try:
            return part.backend.step(
                part.params,
                grads,
                part.exp_avgs,
                part.exp_avg_sqs,
                part.max_exp_avg_sqs,
                part.state_steps,
                part_hp,
                on(part.device, grad_scale),
                on(part.device, found_inf),
                **extra,
            )
        except RuntimeError:
            if checked and grads is not None:
                self._check_grads(gi, part, grads)  # raises torch's message for a sparse grad
            raise

    # NOTE [torch.compile]: a compiled training step runs the optimizer step eagerly (one graph break). Tracing
    # the step would bake lr, the step counts and the plan's Python decisions into guards: a scheduler changing
    # lr would recompile every step, and the plan cache's bookkeeping does not trace. The kernels do the work
    # either way; what the graph break costs is one return to Python per training step. In eager code the step
    # does not go through the disable wrapper (~2.6 us a call, a sixth of a small step's fixed cost).
    @_hooked_step
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None):
        """Perform a single optimization step.

        Args:
            closure: a closure that reevaluates the model and returns the loss.
            grad_scale, found_inf: AMP's scale and inf flag (torch.amp.GradScaler sets them as attributes of the
                optimizer instead; either way works). With grad_scale the grads are unscaled in place; a nonzero
                found_inf skips the step entirely, as torch's fused Adam does.
        """
        if torch.compiler.is_compiling():
            return self._step_not_traced(closure, grad_scale=grad_scale, found_inf=found_inf)
        return self._step(closure, grad_scale=grad_scale, found_inf=found_inf)

    @torch.compiler.disable
    def _step_not_traced(self, closure, *, grad_scale, found_inf):
        return self._step(closure, grad_scale=grad_scale, found_inf=found_inf)

    def _step(self, closure: Callable[[], Any] | None = None, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None):
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(self, "_cuda_graph_capture_health_check", None)
        if health_check is not None:
            health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        moved: dict[tuple[int, torch.device], Tensor] = {}

        def on(device: torch.device, t: Tensor | None) -> Tensor | None:
            if t is None or t.device == device:
                return t
            key = (id(t), device)
            if key not in moved:
                moved[key] = t.to(device, non_blocking=True)
            return moved[key]

        with torch.set_grad_enabled(self.defaults["differentiable"]):
            clipping = self.max_grad_norm is not None
            group_grads = [[p.grad for p in group["params"]] for group in self.param_groups] if clipping else None
            clip_coef = self._clip_coef(group_grads, grad_scale) if clipping else None
            for gi, group in enumerate(self.param_groups):
                params = group["params"]
                hp = self._hyper(group)
                plan = self._plans.get(gi)
                valid = (
                    plan is not None
                    and plan.params is params
                    and plan.num_params == len(params)
                    and plan.generation == _State.generation
                    and plan.key == self._plan_key(group)
                )
                # The kernel reads the grads itself (NOTE [grads read in C++] in csrc/ops.cpp); it declines, having
                # changed nothing, if a param has no grad or anything is off, and the path below handles that.
                if valid and plan.reads_grads and not clipping:
                    try:
                        if self._step_part(gi, plan.parts[0], None, hp, grad_scale, found_inf, None, on):
                            continue
                    except RuntimeError:
                        pass  # raised before writing anything; the path below raises it again, worded as torch's
                grads = group_grads[gi] if clipping else [p.grad for p in params]
                has_grad = [g is not None for g in grads]
                if not valid or plan.has_grad != has_grad:
                    plan = self._plans[gi] = self._build_plan(gi, group, has_grad, hp)
                for part in plan.parts:
                    part_grads = grads if part.index is None else [grads[i] for i in part.index]
                    self._step_part(gi, part, part_grads, hp, grad_scale, found_inf, clip_coef, on)
        return loss


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay) with a fused step; drop-in for torch.optim.AdamW."""

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        **beyond_torch,
    ) -> None:
        """torch.optim.AdamW's arguments, plus FusedAdam's `backend` and its options beyond torch
        (master_weights, state_dtype, stochastic_rounding, seed, max_grad_norm)."""
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=True, backend=backend, **beyond_torch,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
