"""The step plan: each param group split once into partitions, each stepped by one backend.

NOTE [step plan]: building the per-group lists (params with grads, their states, partitions, chosen backends) is
the per-parameter Python work that dominates torch's step() for many small tensors. It is done once per group and
kept in a Plan, which a step reuses while it is valid (Plan.valid). Everything that torch's for-loop would see
changed is either seen by that check or by the backend's per-tensor checks, at O(1) Python cost per step:
  * the group's params list: the same list object, the same length, and the same items (one identity compare per
    item, in C++ where the extension is built);
  * the options that shape the plan (the plan key: amsgrad, capturable, the options beyond torch, weight decay on
    or off, a Tensor lr or not), and flatten_parameters' epoch (flattening moves params into slots: a plan built
    before has no flat run);
  * the optimizer's state: a StateDict bumps its optimizer's generation when a tensor in it is replaced or removed
    (NOTE [state generation]); add_param_group, load_state_dict and a dict put in place of `opt.state` drop every
    plan;
  * complex (and DTensor) params, stepped through kernel views the plan holds: each view still a view of what its
    param and states hold now (a `.data` replaced leaves a view on the old memory, per such param, in Python);
  * which params have grads (a grad that appears or disappears rebuilds the plan);
  * per tensor, every step, in the backend's check pass: the param's, grad's and states' shapes, dtypes, devices
    and layouts (a `.data` replaced with a tensor of another shape raises; one of the same shape is stepped where
    it now lives). Values changed in place (step counts, moments, a Tensor lr) are read where they live.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from . import flat
from .args import storage_error, storage_shortfall
from .backends import Backend, PartOptions
from .state import kernel_view, needs_view


@dataclass(frozen=True)
class Dispatch:
    """Which backend ran one (device, dtype) partition of a param group, and why the others did not."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)
    num_params: int = 0


@dataclass(eq=False)
class Partition:
    """One (device, dtype, occurrence) partition of a param group: the tensors one backend call steps.

    Lists are aligned (entry i of each belongs to param i of the partition) and hold what a kernel sees: a complex
    tensor's view_as_real, a DTensor's local shard (views of the optimizer's tensors, so in-place updates land)."""

    group_index: int
    device: torch.device
    dtype: torch.dtype
    options: PartOptions
    index: list[int] | None  # positions in the group's params; None: all of them, in order
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty unless options.amsgrad
    state_steps: list[Tensor]
    master_params: list[Tensor]  # fp32 masters (options.master), else empty
    tensor_ids: list[int]  # each param's index over all groups (stochastic rounding's stream id)
    view_pos: list[int]  # positions whose grads need kernel_view (complex or DTensor params)
    reads_grads: bool = False  # every param is a plain Tensor/Parameter of the group, in order: grads=None offered
    backend: Backend | None = None
    dispatch: Dispatch | None = None
    prepared: Any = None  # what backend.prepare() keeps for the life of this partition
    flat: Any = None  # a flat.FlatRun: the params are consecutive slots of a flat buffer (NOTE [flat run wiring])
    flat_part: Partition | None = None  # flat.partition(self): what the backend steps while flat.valid()

    def __len__(self) -> int:
        return len(self.params)

    def grads_from_params(self) -> list[Tensor] | None:
        """Each param's .grad (for a backend offered grads=None that does not read them natively), or None if a
        param has none."""
        grads = [p.grad for p in self.params]
        return None if any(g is None for g in grads) else grads

    def param_index(self, pos: int) -> int:
        """The group position of this partition's entry `pos` (error messages name the group's param index)."""
        return self.index[pos] if self.index is not None else pos


def _same_items_py(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def same_items(a: list, b: list) -> bool:
    """len(a) == len(b) and a[i] is b[i] for every i: in C++ where the extension is built (a few ns an item)."""
    native = _native_same_items()
    return native(a, b) if native is not None else _same_items_py(a, b)


@functools.lru_cache(maxsize=None)
def _native_same_items():
    try:
        from . import _C
    except Exception:  # built without the extension: the Python loop (~25 ns an item)
        return None
    return getattr(_C, "same_items", None)


_PLAIN = (Tensor, torch.nn.Parameter)  # types whose .grad a kernel can read itself (no grad property of their own)


@dataclass(eq=False)
class Plan:
    """One param group's partitions and what they were built from (NOTE [step plan])."""

    params: list[Tensor]  # the group's params list object
    snapshot: list[Tensor]  # its items when the plan was built
    has_grad: list[bool]
    key: tuple
    parts: list[Partition]
    generation: int = -1  # the optimizer's state generation once this plan's states were made (NOTE [state generation])
    all_grads: bool = False  # every param had a grad when built (has_grad, decided once, not per step)
    all_flat: bool = False  # every partition is a flat run (NOTE [flat run wiring])
    has_views: bool = False  # a partition holds kernel views (complex or DTensor params)
    has_flat: bool = False  # some partition is a flat run
    uses_ids: bool = False  # some partition rounds stochastically: its tensor_ids count from first_id
    first_id: int = 0  # the group's first param's index over all groups, when built

    def __post_init__(self):
        self.all_grads = all(self.has_grad)
        self.all_flat = all(part.flat is not None for part in self.parts)
        self.has_flat = any(part.flat is not None for part in self.parts)
        self.has_views = any(part.view_pos for part in self.parts)
        self.uses_ids = any(part.options.stochastic_rounding for part in self.parts)

    def valid(self, params: list[Tensor], key: tuple, generation: int, state: dict) -> bool:
        return (self.params is params and self.generation == generation and self.key == key
                and same_items(self.snapshot, params) and (not self.has_views or self._views_current(state)))

    def _views_current(self, state: dict) -> bool:
        """The kernel views a partition holds for complex (or DTensor) params and their states are views of what
        those tensors hold now: a `.data` replaced on one leaves the view on the old memory, which the backends'
        checks cannot see (the view is a tensor of its own). Per step, per such param."""
        for part in self.parts:
            for pos in part.view_pos:
                p = self.snapshot[part.param_index(pos)]
                st = state.get(p) or {}
                pairs = [(p, part.params), (st.get("exp_avg"), part.exp_avgs), (st.get("exp_avg_sq"), part.exp_avg_sqs)]
                if part.options.amsgrad:
                    pairs.append((st.get("max_exp_avg_sq"), part.max_exp_avg_sqs))
                for t, lst in pairs:
                    if not isinstance(t, Tensor) or not needs_view(t) or not _same_view(kernel_view(t), lst[pos]):
                        return False
        return True


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def build(group_index: int, group: dict[str, Any], has_grad: list[bool], key: tuple, first_id: int, clip: bool, choose: Callable[[Partition], tuple[Backend, Dispatch]],
          make_states: Callable[[dict, PartOptions, list[Tensor], Any], list[dict[str, Tensor]]]) -> Plan:
    """Split the group's params with grads into (device, dtype, occurrence) partitions, create their states, and
    pick and prepare each partition's backend. `first_id`: the group's first param's index over all groups."""
    params = group["params"]
    by_key: dict[tuple, list[int]] = {}
    # A param listed twice in a group (torch warns: "duplicate parameters") is updated twice, one after the other,
    # as torch's for-loop does: its k-th occurrence goes to a partition of its own, stepped after the (k-1)-th. In
    # one call a kernel's threads could run both updates at once on the same memory.
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if has_grad[i]:
            view = kernel_view(p)
            occurrence = seen[id(p)] = seen.get(id(p), -1) + 1
            by_key.setdefault((view.device, view.dtype, occurrence), []).append(i)
    parts = []
    for (device, dtype, occurrence), index in by_key.items():
        opts = PartOptions.of(group, dtype, clip)
        members = [params[i] for i in index]
        run = flat.find_run(members, opts, f"param group {group_index}")  # (make_states may decline it)
        packed = make_states(group, opts, members, run)
        if run is not None and not run.bind(packed):
            run = None
        lists: dict[str, list[Tensor]] = {k: [] for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                                         "state_steps", "master_params")}
        view_pos = []
        for pos, p in enumerate(members):
            st = packed[pos]
            if needs_view(p):
                view_pos.append(pos)
            lists["params"].append(kernel_view(p))
            lists["exp_avgs"].append(kernel_view(st["exp_avg"]))
            lists["exp_avg_sqs"].append(kernel_view(st["exp_avg_sq"]))
            if opts.amsgrad:
                lists["max_exp_avg_sqs"].append(kernel_view(st["max_exp_avg_sq"]))
            lists["state_steps"].append(st["step"])
            if opts.master:
                lists["master_params"].append(st["master_param"])
        everything = len(by_key) == 1 and len(index) == len(params)
        part = Partition(
            group_index, device, dtype, opts, None if everything else index, view_pos=view_pos,
            tensor_ids=[first_id + i for i in index],
            reads_grads=everything and not view_pos and all(type(p) in _PLAIN for p in params), **lists,
        )
        part.backend, part.dispatch = choose(part)
        part.backend.prepare(part)
        if run is not None:
            part.flat, part.flat_part = run, run.partition(part)
            part.backend.prepare(part.flat_part)
        parts.append(part)
    return Plan(params, list(params), has_grad, key, parts, first_id=first_id)


def check_tensors(part: Partition, grads: list[Tensor], grads_written: bool = False) -> None:
    """The per-tensor checks, in Python, for backends that have no native check pass (the reference backend): every
    grad and state of the param's shape, on its device, grads not sparse; raised before anything is written."""
    who = f"FusedAdam ({part.backend.name if part.backend else '?'} backend)"
    arrays = [("grads", grads), ("exp_avgs", part.exp_avgs), ("exp_avg_sqs", part.exp_avg_sqs)]
    if part.options.amsgrad:
        arrays.append(("max_exp_avg_sqs", part.max_exp_avg_sqs))
    if part.options.master:
        arrays.append(("master_params", part.master_params))
    state_dtype = part.options.state_dtype
    if part.params and not part.dtype.is_floating_point:  # (complex params arrive as their real views)
        raise RuntimeError(f"{who}: params[0] (param {part.param_index(0)} of group {part.group_index}) has dtype "
                           f"{part.dtype}; Adam steps floating-point and complex params")
    for pos, p in enumerate(part.params):
        where = f"(param {part.param_index(pos)} of group {part.group_index})"
        if p.dtype != part.dtype:
            raise RuntimeError(f"{who}: params[{pos}] {where} has dtype {p.dtype}; this partition steps {part.dtype} "
                               "(a param's dtype changed under the optimizer)")
        for name, tensors in arrays:
            t = tensors[pos]
            want = torch.float32 if name == "master_params" else (p.dtype if name == "grads" else state_dtype)
            if t.dtype != want:
                raise RuntimeError(f"{who}: {name}[{pos}] {where} has dtype {t.dtype}; expected {want}")
            if t.layout != torch.strided:
                raise RuntimeError(f"{who}: {name}[{pos}] (param {part.param_index(pos)} of group "
                                   f"{part.group_index}) has layout {t.layout}; expected torch.strided")
            if t.shape != p.shape or t.device != p.device:
                raise RuntimeError(
                    f"{who}: {name}[{pos}] (param {part.param_index(pos)} of group {part.group_index}) has shape "
                    f"{tuple(t.shape)} on {t.device}; its param has shape {tuple(p.shape)} on {p.device}")
        s = part.state_steps[pos]
        if s.numel() != 1:
            raise RuntimeError(f"{who}: state_steps[{pos}] (param {part.param_index(pos)} of group "
                               f"{part.group_index}) has {s.numel()} elements; expected a 0-dim step count")
        named = [("params", p), *((name, tensors[pos]) for name, tensors in arrays)]
        for name, t in [*named, ("state_steps", s)]:
            check_memory(who, name, pos, t, where, grads_written)
        if s.device.type == "cpu" and not s.item() >= 0:  # tensor_pass.h's check_counts (device counts: not read)
            raise ValueError(f"{who}: state_steps[{pos}] {where} is {s.item()}; a step count is a number >= 0")
        check_apart(who, named, pos, where)
    check_arrays_apart(who, [("params", part.params), *arrays, ("state_steps", part.state_steps)],
                       lambda pos: f"(param {part.param_index(pos)} of group {part.group_index})")


def check_memory(who: str, name: str, pos: int, t: Tensor, where: str = "", grads_written: bool = False) -> None:
    """tensor_pass.h's check_memory: the storage holds the tensor's elements (torch's kernels do not check: a storage
    resized under a tensor, as FSDP frees params with `untyped_storage().resize_(0)`, is read out of bounds), and an
    array the step writes (all but the grad, unless grads_written) has no two elements at one address."""
    if t.numel() == 0 or t.is_meta:
        return
    where = f" {where}" if where else ""
    lack = storage_shortfall(t)
    if lack:
        raise storage_error(f"{who}: {name}[{pos}]{where}", t, lack)
    if (name != "grads" or grads_written) and torch._debug_has_internal_overlap(t) == 1:  # (1: MemOverlap::Yes)
        raise RuntimeError(f"{who}: {name}[{pos}]{where} has elements that share memory (shape {tuple(t.shape)}, "
                           f"strides {t.stride()}): the step writes it, so each element needs its own")


def dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel*itemsize) in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def byte_range(t: Tensor) -> tuple[int, int] | None:
    """The bytes [lo, hi) that a non-overlapping and dense tensor's elements fill; None for any other (which
    at::get_overlap_status, and so the checks, do not compare)."""
    if not dense(t):
        return None
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()


def check_apart(who: str, named: list[tuple[str, Tensor]], pos: int, where: str = "") -> None:
    """tensor_pass.h's check_apart: a param's arrays share no memory (at::get_overlap_status's rule: the same
    tensor, or two dense tensors whose byte ranges in one storage intersect). The step reads and writes them element
    by element, where torch's for-loop writes one whole array before reading the next: both would be wrong."""
    spans = []
    for name, t in named:
        if t.numel() == 0:
            continue
        extent = byte_range(t)
        span = (t.untyped_storage().data_ptr(), *extent) if extent is not None else None
        for other_name, other, other_span in spans:
            if other is t or (span is not None and other_span is not None and span[0] == other_span[0]
                              and span[1] < other_span[2] and other_span[1] < span[2]):
                where_ = f" {where}" if where else ""
                raise RuntimeError(f"{who}: {other_name}[{pos}] and {name}[{pos}]{where_} share memory; "
                                   "each needs its own")
        spans.append((name, t, span))


_ROWS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps")


def check_arrays_apart(who: str, named: list[tuple[str, list[Tensor]]],
                       where: Callable[[int], str] | None = None) -> None:
    """tensor_pass.h's NOTE [arrays apart]: what a step writes of one param (the param, its states, its step count)
    shares no memory with any array of another param (grads may share memory with each other: a step reads them;
    under grad_scale, a grad shared by two params is unscaled twice, as by torch's fused step).
    A kernel updates the params of a call at once, torch's for-loop one after the other: the two would disagree.
    Only non-overlapping and dense arrays are compared (at::get_overlap_status's rule). `named`: (list name, one
    tensor per param), every list of the call."""
    spans = []
    for name, tensors in named:
        for pos, t in enumerate(tensors):
            extent = byte_range(t) if t.numel() and not t.is_meta else None
            if extent is not None:
                spans.append((*extent, name != "grads", name, pos))
    spans.sort(key=operator.itemgetter(0))
    reach = written_reach = None  # the span (the written span) reaching furthest so far
    for span in spans:
        other = reach if span[2] else written_reach
        if other is not None and span[0] < other[1]:  # it overlaps an earlier span exactly then
            (_, _, _, a, i), (_, _, _, b, j) = sorted([other, span], key=lambda x: (x[4], _ROWS.index(x[3])))
            at = (lambda pos: f" {where(pos)}") if where is not None else (lambda pos: "")
            raise RuntimeError(f"{who}: {a}[{i}]{at(i)} and {b}[{j}]{at(j)} share memory: a step updates every "
                               "param of a call at once, where torch's for-loop updates one after the other, so what "
                               "a step writes (a param, its states, its step count) needs memory apart from every "
                               "other param's arrays")
        if reach is None or span[1] > reach[1]:
            reach = span
        if span[2] and (written_reach is None or span[1] > written_reach[1]):
            written_reach = span
