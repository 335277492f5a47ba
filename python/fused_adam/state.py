"""The optimizer's per-parameter state: torch's layout, created lazily, and watched for replacement.

NOTE [state generation]: a step plan (plan.py) holds each partition's state tensors. Anything that replaces or
removes one (`opt.state[p]["exp_avg"] = t`, `opt.state[p] = {...}`, `del opt.state[p]`, `update`, `|=`, `pop`, ...)
bumps its optimizer's generation, so that the plan is rebuilt at the next step; a dict put in place of `opt.state`
(a reset) drops every plan. Adding an entry does not bump it: a plan holds only tensors that are in the dict, so a
new one cannot be in any plan, and a plan's own lazily created states then leave the other plans valid. Changes in
place (`.fill_`, `.data = ...` on the same tensor object) are read where they live, and the backends' per-tensor
checks see a new shape. The counter is per optimizer: a state write in one optimizer leaves the plans of every
other one alone.

NOTE [packed states]: the states a plan creates for small params (exp_avg, exp_avg_sq, max_exp_avg_sq, the fp32
master; params of at most 64K elements) are 64-byte-aligned views into shared buffers of up to 1M elements per state
kind, instead of one allocation per param; the step counts of all the params a plan creates states for (whatever
their size) are 0-dim views into one float32 buffer. The
values, shapes, strides and state_dict are torch's; what changes is where they live: a step over many small tensors
then walks long arrays instead of thousands of separate pages (bench/NOTES.md has the figures). The buffers are
bounded because torch.save of one view writes its whole buffer (a checkpoint of the whole state_dict writes each
buffer once; saving state tensors one by one writes up to 4 MB each: clone them first). Large params gain nothing
from it, and params that need a view (complex, DTensor) or are not contiguous get states of their own, as torch
makes them; so do states that already exist (e.g. loaded from a torch checkpoint).
"""
from __future__ import annotations

import numbers
import sys
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .args import describe
from .backends import PartOptions

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# NOTE [packed states]: which params get packed states, and into how large buffers (elements).
PACK_MAX_NUMEL = 1 << 16
PACK_BUFFER = 1 << 20


_ABSENT = object()


class Generation:
    """An optimizer's state generation (NOTE [state generation]), and the journal of a step's state writes.

    NOTE [state journal]: a step makes and converts states as it builds its plans (lazily created states, a float
    step count made a tensor, moments brought to the state dtype, states moved into a flat run's buffers), before
    every group is checked. If the step then raises before it writes a param, rollback() puts every entry it wrote
    back as it was, so that the error changes nothing, in every group (the states themselves are new tensors, never
    written in place)."""

    __slots__ = ("value", "journal")

    def __init__(self) -> None:
        self.value = 0
        self.journal: list | None = None  # (dict, key, the value before or _ABSENT) while a step may roll back

    def bump(self) -> None:
        self.value += 1

    def record(self, d: dict, key) -> None:
        if self.journal is not None:
            self.journal.append((d, key, dict.get(d, key, _ABSENT)))

    def rollback(self) -> None:
        """Every entry recorded since the journal began, as it was; the plans built on them are stale."""
        for d, key, before in reversed(self.journal or ()):
            if before is _ABSENT:
                dict.pop(d, key, None)
            else:
                dict.__setitem__(d, key, before)
        self.journal = None
        self.bump()


class _Watched:
    """What ParamState and StateDict share: each dict method that replaces or removes an entry bumps the generation
    and each write is journaled (dict's C methods, update and |= included, do not call __setitem__ / __delitem__,
    so each is routed here). Adding an entry does not bump it: no plan holds a tensor that is not in the dict (NOTE
    [state generation])."""

    __slots__ = ()

    def _watch(self) -> Generation | None:
        raise NotImplementedError

    def _bump(self) -> None:
        generation = self._watch()
        if generation is not None:
            generation.bump()

    def _record(self, key) -> None:
        generation = self._watch()
        if generation is not None:
            generation.record(self, key)
            if key in self:
                generation.bump()

    def __delitem__(self, key):
        self._bump()
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()

    def clear(self):
        self._bump()
        super().clear()


class ParamState(_Watched, dict):
    """A parameter's state dict, watched (_Watched)."""

    __slots__ = ("_generation",)

    def __init__(self, *args, generation: Generation | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._generation = generation

    def _watch(self) -> Generation | None:
        return self._generation

    def __setitem__(self, key, value):
        self._record(key)
        super().__setitem__(key, value)

    def __reduce__(self):  # pickles and deep-copies as a plain dict's contents; the optimizer rebinds it
        return (ParamState, (dict(self),))


class StateDict(_Watched, defaultdict):
    """optimizer.state: param -> ParamState (other keys and values, as torch allows, are kept as they are), watched
    (_Watched)."""

    def __init__(self, generation: Generation, items=()) -> None:
        super().__init__(None)
        self.generation = generation
        for k, v in dict(items).items():
            self[k] = v

    def _watch(self) -> Generation:
        return self.generation

    def __missing__(self, key):
        value = ParamState(generation=self.generation)
        self._record(key)
        super().__setitem__(key, value)
        return value

    def __setitem__(self, key, value):
        self._record(key)
        if isinstance(value, dict) and not (isinstance(value, ParamState) and value._generation is self.generation):
            value = ParamState(value, generation=self.generation)  # (an OrderedDict too: watched like the others)
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self):  # a plain defaultdict(dict) for pickle and deepcopy: the optimizer rebinds it
        return (defaultdict, (dict,), None, None, iter(self.items()))


def is_count(value) -> bool:
    """What a state's step count may be before it is made a float32 tensor: a number or a tensor (a string would be
    read by float())."""
    return isinstance(value, (Tensor, numbers.Real))


def dtensor_type() -> type | tuple:
    """DTensor, if torch.distributed.tensor is imported (no DTensor can exist before), else () (isinstance(x, ())
    is False). Importing that module costs ~0.8 s; a user who has DTensors has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", ()) if module is not None else ()


def needs_view(t: Tensor) -> bool:
    return t.is_complex() or isinstance(t, dtensor_type())


def kernel_view(t: Tensor) -> Tensor:
    """What a backend sees of a tensor: a DTensor's local shard, a complex tensor's view_as_real. Both are views of
    the same storage, so the backend's in-place updates land in the optimizer's tensors."""
    if isinstance(t, dtensor_type()):
        t = t._local_tensor
    return torch.view_as_real(t) if t.is_complex() else t


@torch.no_grad()
def packed_states(state: StateDict, opts: PartOptions, params: list[Tensor]) -> list[dict[str, Tensor]]:
    """Zeroed states and master slots for the small params that have no state yet, as views into shared buffers of at
    most PACK_BUFFER elements per state kind, and the step counts of every param without state, as views into one
    buffer (NOTE [packed states]); per param, the views param_state will use."""
    views: list[dict[str, Tensor]] = [{} for _ in params]
    if opts.differentiable:  # autograd refuses in-place updates of views made under no_grad: states of their own
        return views
    where = {id(p): i for i, p in enumerate(params)}
    stateless = [p for p in params if not state.get(p)]
    if len(stateless) > 1:  # every new param's step count, whatever its size: one buffer, read and bumped as one
        steps = torch.zeros(len(stateless), dtype=torch.float32, device=stateless[0].device if opts.capturable else "cpu")
        for j, q in enumerate(stateless):
            views[where[id(q)]]["step"] = steps[j]
    fresh = [p for p in stateless if p.numel() <= PACK_MAX_NUMEL and p.is_contiguous() and not needs_view(p)]
    if not fresh:
        return views
    kinds = {key: opts.state_dtype for key in STATE_KEYS if key != "max_exp_avg_sq" or opts.amsgrad}
    if opts.master:
        kinds["master_param"] = torch.float32
    bucket: list[Tensor] = []
    filled = 0
    for p in fresh + [None]:  # None closes the last bucket
        if bucket and (p is None or filled + p.numel() > PACK_BUFFER):
            if len(bucket) > 1:
                for key, dtype in kinds.items():
                    align = 64 // dtype.itemsize
                    sizes = [-(-q.numel() // align) * align for q in bucket]
                    buffer = torch.zeros(sum(sizes), dtype=dtype, device=bucket[0].device)
                    for q, slot in zip(bucket, buffer.split(sizes)):
                        views[where[id(q)]][key] = slot[: q.numel()].view(q.shape)
            bucket, filled = [], 0
        if p is not None:
            bucket.append(p)
            filled += p.numel()
    return views


_REQUIRED = frozenset(("step", "exp_avg", "exp_avg_sq"))


def param_state(state: StateDict, p: Tensor, opts: PartOptions, packed: dict[str, Tensor] | None = None) -> ParamState:
    """p's state, created (lazily, as torch does) or brought to what the partition's options need. `packed`: zeroed
    views to create missing states in (NOTE [packed states]). p is the param itself (complex or DTensor)."""
    st = state[p]
    if st and not _REQUIRED.issubset(st.keys()):  # torch's step raises KeyError; zeros would step a wrong update
        missing = sorted(_REQUIRED.difference(st.keys()))
        raise KeyError(f"FusedAdam: the state of the param of shape {tuple(p.shape)} has {sorted(st.keys())} but no "
                       f"{', '.join(missing)} (an Adam state holds step, exp_avg and exp_avg_sq; to start it over, "
                       f"delete the whole entry: del opt.state[p])")
    step_device = p.device if opts.capturable else torch.device("cpu")
    if "step" not in st:
        st["step"] = packed["step"] if packed and "step" in packed else torch.zeros((), dtype=torch.float32, device=step_device)
    state_dtype = opts.state_dtype if not p.is_complex() else p.dtype
    for key in STATE_KEYS:
        if key == "max_exp_avg_sq" and not opts.amsgrad:
            continue
        if key not in st:
            if packed and key in packed:
                st[key] = packed[key]
            else:
                st[key] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        elif not torch.is_tensor(st[key]):
            raise TypeError(f"FusedAdam: state[{key!r}] of the param of shape {tuple(p.shape)} is "
                            f"{describe(st[key])}; expected a tensor")
        elif st[key].dtype != state_dtype:
            t = st[key]
            if not (t.is_floating_point() or t.is_complex()) or t.is_complex() != p.is_complex():
                raise TypeError(f"FusedAdam: state[{key!r}] of the param of shape {tuple(p.shape)} has dtype {t.dtype}; "
                                f"expected {state_dtype} (a floating-point state of a real param, complex of a complex)")
            st[key] = t.to(state_dtype)
    if opts.master and "master_param" not in st:
        if packed and "master_param" in packed:
            st["master_param"] = packed["master_param"].copy_(p.detach())
        else:
            st["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
    elif opts.master and not torch.is_tensor(st["master_param"]):
        raise TypeError(f"FusedAdam: state['master_param'] of the param of shape {tuple(p.shape)} is "
                        f"{describe(st['master_param'])}; expected a tensor")
    step = st["step"]
    if not torch.is_tensor(step) or step.dtype != torch.float32 or step.device != step_device or step.dim():
        try:
            if not is_count(step):
                raise TypeError
            count = float(step)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"FusedAdam: state['step'] of the param of shape {tuple(p.shape)} is "
                             f"{describe(step)}; expected a number or a one-element tensor") from None
        st["step"] = torch.tensor(count, dtype=torch.float32, device=step_device)
    return st


def rebind(state: Any, generation: Generation) -> StateDict:
    """torch's optimizer.state (after __setstate__ or load_state_dict: a defaultdict of plain dicts) as a StateDict."""
    if isinstance(state, StateDict) and state.generation is generation:
        return state
    return StateDict(generation, state)
