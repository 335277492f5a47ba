"""Flat param and grad buffers, opt-in: the params of each (device, dtype) as slots of one buffer, stepped as one range.

    buffers = fused_adam.flatten_parameters(model)       # in place; before the optimizer is made
    opt = FusedAdamW(model.parameters())
    for batch in data:
        loss(model, batch).backward()                    # autograd accumulates into the grad buffer's views
        opt.step()                                       # one range per buffer: no per-tensor work
        opt.zero_grad(set_to_none=False)                 # or: for b in buffers: b.zero_grad()

NOTE [flat buffers]: flatten_parameters moves each param's values into a slot of a contiguous buffer (slots aligned
to `align` bytes, the padding zero) and makes `p.data` a view of its slot, and p.grad (where it has one) a view of
the same slot of a second, zeroed buffer. The Parameter objects stay the same objects, so modules, autograd, hooks,
state_dict and checkpoints see nothing new (as with Megatron's param-and-grad buffers and apex's contiguous
buffers). Autograd accumulates into an existing dense grad in place (AccumulateGrad's "existing grad, grad mode off"
case), so a backward writes into the grad buffer. A param without a grad keeps none (torch skips it: a zero grad
would be stepped, its weight decayed, its count bumped): the first grad autograd gives it is moved into its slot
by a one-shot post-accumulate-grad hook (NOTE [grad adoption]). zero_grad(set_to_none=True), torch's default, sets
p.grad to None, and the next backward makes fresh grads that are not the views (as does a backward with
create_graph=True, out of place): each such step runs per tensor. Use zero_grad(set_to_none=False), or
FlatBuffer.zero_grad() (one memset; a replaced grad becomes its zeroed view again, a param whose grad is None keeps
none until its next grad is adopted).

NOTE [grad adoption]: the hook runs once, after autograd gave a param its first grad (p.grad was None): it copies
the grad into the slot and makes p.grad the view, so that later backwards accumulate in place. It leaves the grad
alone where the param left its slot, or the grad is not a plain dense grad of the param's shape and dtype owning its
memory (a view of a bucket of DDP's is DDP's), or it has a graph (create_graph=True). Its cost is once per param,
not per step.

The optimizer side (find_run, FlatRun): when a partition's params are consecutive slots of one buffer, the
optimizer keeps their states as views of flat state buffers of the same layout (state_dict is torch's layout) and
each param's step count as a 0-dim view of one float32 buffer, and steps the whole range as one tensor with one
counter. Padding is zero in params, grads and states, and Adam keeps a zero there zero (no grad, no moment, no
decay of 0), so the range steps exactly as the slots would one by one. Before each such step, FlatRun.valid()
checks what a user can change: every param still its slot (`p.data` not replaced), every grad still its view (not
replaced, not None), every state tensor still its view, and the step counts all equal (compared every step on
the host; on a device, when the step buffer's version counter moved). If anything differs, the partition is
stepped tensor by tensor, as without flat buffers: never a wrong step. A param listed twice (in one group or
two) gets no run: its second listing steps the same state, after the first (optimizer._make_states).

NOTE [flat run wiring]: what the step plan does with a partition (tests/test_flat.py's FlatDriver does the same):
  * when it builds the partition: run = find_run(members, opts); views = run.states(optimizer.state) (None: no
    run); each param's state made by state.param_state(..., packed=views[i]); run.bind(states) (False: no run);
    then flat_part = run.partition(part), which the backend prepares like part;
  * each step: run.valid() ? (backend.step(flat_part, [run.grad], hp, amp); run.stepped()) : the per-tensor step.
    The flat step reads no grad list, so it may skip the group's list of grads only where the plan covers every
    param of the group: a param outside the partitions that gains a grad must be stepped too.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .args import warn
from .state import is_count

if TYPE_CHECKING:
    from .backends import PartOptions

__all__ = ["FlatBuffer", "FlatRun", "flatten_parameters", "find_run"]

# The attribute a flattened param carries (a _Tag). A plain attribute, not a registry keyed by id(): it lives and
# dies with the param.
ATTR = "_fused_adam_flat"

# How many times flatten_parameters has run: part of every step plan's key (plan.py), so that a plan built before
# a flattening is built again (its runs found, existing states moved into flat state buffers).
EPOCH = [0]


class _Tag:
    """A flattened param's buffer and slot index. A pickled or copied param is a new tensor of its own memory, not
    the slot: its copy of the tag is empty (and pickling a param does not pickle the whole buffer's params)."""

    __slots__ = ("flat", "index")

    def __init__(self, flat: FlatBuffer | None, index: int) -> None:
        self.flat, self.index = flat, index

    def __reduce__(self):
        return (_Tag, (None, -1))
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


def _aligned_zeros(numel: int, dtype: torch.dtype, device: torch.device, align: int) -> Tensor:
    """A zeroed 1-D tensor whose first element is `align`-byte aligned (allocators align to 64 bytes or more; a
    larger `align` is met by allocating a little more and starting later)."""
    raw = torch.zeros(numel + align // dtype.itemsize, dtype=dtype, device=device)
    shift = (-raw.data_ptr() % align) // dtype.itemsize if align > 1 else 0
    return raw[shift: shift + numel]


def _slot(buffer: Tensor, offset: int, shape: torch.Size) -> Tensor:
    return buffer[offset: offset + shape.numel()].view(shape)


@dataclass(eq=False)
class FlatBuffer:
    """The params of one (device, dtype), in slots of one buffer; their grads in the same slots of a second one.

    params[i] is a view of param_buffer[offsets[i]: offsets[i] + params[i].numel()] (while nobody replaces its
    .data); its grad, the same range of grad_buffer. No reference to the grad views is kept."""

    device: torch.device
    dtype: torch.dtype
    params: list[Tensor]
    offsets: list[int]
    shapes: list[torch.Size]
    param_buffer: Tensor
    grad_buffer: Tensor
    numels: list[int] = dataclasses.field(init=False)
    param_ptrs: list[int] = dataclasses.field(init=False)  # where each param's slot starts (what a check compares)
    grad_ptrs: list[int] = dataclasses.field(init=False)
    dtypes: list[torch.dtype] = dataclasses.field(init=False)  # dtype, once a slot (a grad has its param's)
    _adopting: dict = dataclasses.field(init=False, default_factory=dict)  # slot -> its adoption hook's handle

    def __post_init__(self) -> None:
        self.numels = [s.numel() for s in self.shapes]
        self.dtypes = [self.dtype] * len(self.shapes)
        size = self.dtype.itemsize
        # data_ptr() of a tensor without elements is 0 (and nothing of it is stepped)
        slots = list(zip(self.offsets, self.numels))
        self.param_ptrs = [self.param_buffer.data_ptr() + o * size if n else 0 for o, n in slots]
        self.grad_ptrs = [self.grad_buffer.data_ptr() + o * size if n else 0 for o, n in slots]

    def __len__(self) -> int:
        return len(self.params)

    def grad_view(self, i: int) -> Tensor:
        return _slot(self.grad_buffer, self.offsets[i], self.shapes[i])

    def adopt_next_grad(self, i: int) -> None:
        """NOTE [grad adoption]: the next grad autograd gives params[i] (whose grad is None) becomes its slot's view."""
        p = self.params[i]
        if i in self._adopting or not p.requires_grad:
            return
        handle = None

        def adopt(param: Tensor) -> None:
            handle.remove()
            self._adopting.pop(i, None)
            g = param.grad
            if (g is None or g.grad_fn is not None or g.layout != torch.strided or g.shape != self.shapes[i]
                    or g.dtype != self.dtype or g.device != self.device or not self.params_in_place(i)
                    or g.untyped_storage().nbytes() != g.numel() * g.element_size()):
                return  # (a view of other memory, e.g. DDP's bucket with gradient_as_bucket_view: its owner's)
            view = self.grad_view(i)
            with torch.no_grad():
                view.copy_(g)
            param.grad = view

        handle = p.register_post_accumulate_grad_hook(adopt)
        self._adopting[i] = handle

    def params_in_place(self, i: int | None = None) -> bool:
        """Every param (or params[i]) is still a view of its slot: its .data not replaced."""
        sl = slice(None) if i is None else slice(i, i + 1)
        return _all_at(self.params[sl], self.param_ptrs[sl], self.numels[sl], self.dtypes[sl])

    def grads_in_place(self, i: int | None = None) -> bool:
        """Every param's grad (or params[i]'s) is the view of its grad slot: not None, not replaced."""
        sl = slice(None) if i is None else slice(i, i + 1)
        return _all_at(list(map(_grad, self.params[sl])), self.grad_ptrs[sl], self.numels[sl], self.dtypes[sl])

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero every grad: the grad buffer in one op; a grad that replaced its view becomes the zeroed view again
        (what zero_grad(set_to_none=True) undoes); a param whose grad is None keeps none (torch skips it), and its
        next grad is moved into its slot (NOTE [grad adoption]); a param whose .data was replaced keeps its own grad,
        zeroed as torch's zero_grad(set_to_none=False) does."""
        self.grad_buffer.zero_()
        if self.grads_in_place():
            return
        for i, p in enumerate(self.params):
            if self.grads_in_place(i):
                continue
            g = p.grad
            if g is None:
                if self.params_in_place(i):
                    self.adopt_next_grad(i)
            elif self.params_in_place(i) and g.layout == torch.strided:
                p.grad = self.grad_view(i)
            else:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self.params)} params, {self.param_buffer.numel()} elements of {self.dtype} on "
                f"{self.device})")


_ptr, _numel, _contiguous = Tensor.data_ptr, Tensor.numel, Tensor.is_contiguous
_grad, _dtype = operator.attrgetter("grad"), operator.attrgetter("dtype")


def _all_at(tensors: list, ptrs: list[int], numels: list[int], dtypes: list[torch.dtype]) -> bool:
    """tensors[i] starts at address ptrs[i], holds numels[i] elements of dtypes[i] and is contiguous, for every i
    (and none is None): it is exactly its slot, so stepping the slots' memory is stepping the tensors (the Python
    twin of NOTE [flat slot check]; a `.data` set to a view of the slot as another dtype of its size is not the
    slot). Mapped C methods: about a tenth of a Python loop's cost."""
    try:
        return (list(map(_ptr, tensors)) == ptrs and list(map(_numel, tensors)) == numels
                and list(map(_dtype, tensors)) == dtypes and all(map(_contiguous, tensors)))
    except (TypeError, RuntimeError):  # a None among them (a grad set to None), or one without a data pointer (sparse)
        return False


def _params_of(module_or_params) -> list[Tensor]:
    """The params to flatten: a Module's parameters(), or an iterable of Tensors or of param groups (dicts with
    "params", as an optimizer takes), in order, each once."""
    if isinstance(module_or_params, torch.nn.Module):
        items = list(module_or_params.parameters())
    elif isinstance(module_or_params, Tensor) or not isinstance(module_or_params, Iterable):
        raise TypeError("flatten_parameters: module_or_params should be an nn.Module or an iterable of Tensors or "
                        f"dicts, but got {type(module_or_params).__name__}")
    else:
        items = []
        for i, x in enumerate(module_or_params):
            if isinstance(x, dict):
                group = x.get("params")
                if group is None:
                    raise ValueError(f"flatten_parameters: param group {i} has no 'params' entry")
                items += [group] if isinstance(group, Tensor) else list(group)
            else:
                items.append(x)
    seen: set[int] = set()
    params = []
    for i, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(f"flatten_parameters: item {i} is a {type(p).__name__}, not a Tensor")
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _check(params: list[Tensor], others: list[tuple[Tensor, str]]) -> None:
    """Raise, before anything is moved, for a param whose memory cannot become a slot. others: the tensors that
    stay where they are, with their names (params that do not require grad, a module's buffers): none may share
    memory with a param that moves, which would untie them."""
    for i, p in enumerate(params):
        if type(p) not in (Tensor, torch.nn.Parameter):
            raise TypeError(f"flatten_parameters: param {i} is a {type(p).__name__}; only plain Tensors and "
                            "Parameters can be moved into a buffer (a subclass may keep its own storage)")
        if not p.is_leaf:
            raise ValueError(f"flatten_parameters: param {i} (shape {tuple(p.shape)}) is not a leaf tensor")
        if p.layout != torch.strided:
            raise ValueError(f"flatten_parameters: param {i} has layout {p.layout}; expected torch.strided")
        if p.grad is not None and p.grad.layout != torch.strided:
            raise ValueError(f"flatten_parameters: the grad of param {i} has layout {p.grad.layout}; "
                             "expected torch.strided")
    # Params that share memory (one a view of another) would stop sharing it: refuse, naming both.
    tensors = params + [t for t, _ in others]
    spans = sorted((t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + _extent(t), i)
                   for i, t in enumerate(tensors)
                   if type(t) in (Tensor, torch.nn.Parameter) and t.numel() and t.device.type != "meta")
    moved, end, last = len(params), None, -1  # end: (storage, end) of the span reaching furthest so far, last's
    for storage, begin, stop, i in spans:
        if end is not None and storage == end[0] and begin < end[1] and min(i, last) < moved:
            a, b = sorted((i, last))
            what = f"params {a} and {b}" if b < moved else f"param {a} and {others[b - moved][1]}"
            raise ValueError(f"flatten_parameters: {what} share memory (one is a view of the other, e.g. tied "
                             "weights through a view); flattening would untie them")
        if end is None or storage != end[0] or stop > end[1]:
            end, last = (storage, stop), i


def _extent(p: Tensor) -> int:
    """Bytes from p's first element to the end of its last."""
    return (1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride()))) * p.element_size()


@torch.no_grad()
def flatten_parameters(module_or_params, *, align: int = 64) -> list[FlatBuffer]:
    """Move the params of each (device, dtype) into one contiguous buffer, in place (NOTE [flat buffers]).

    module_or_params: an nn.Module (its parameters()), or an iterable of Tensors or param groups; the buffer
    holds them in that order (give the params of each param group one after the other, so that each group's
    partition is one run of slots). Only params that require grad are moved. Each param's slot starts on an
    `align`-byte boundary; the padding is zero. p.data becomes a view of the slot (contiguous), and p.grad a view
    of the same slot of a zeroed grad buffer where it had a grad (holding its values; a param without one gets
    its first grad moved there, NOTE [grad adoption]). Returns one FlatBuffer per
    (device, dtype), in order of first appearance. Best before the optimizer has state: states made before are
    moved into flat state buffers at its next step (flattening makes every optimizer build its step plan again)."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise ValueError(f"flatten_parameters: align must be a positive power of two (bytes), got {align!r}")
    given = _params_of(module_or_params)
    params = [p for p in given if p.requires_grad]
    if isinstance(module_or_params, torch.nn.Module):
        others = [(p, f"param {name!r} (it does not require grad)")
                  for name, p in module_or_params.named_parameters() if not p.requires_grad]
        others += [(b, f"buffer {name!r}") for name, b in module_or_params.named_buffers()]
    else:
        others = [(p, f"item {i} (it does not require grad)") for i, p in enumerate(given) if not p.requires_grad]
    _check(params, others)
    EPOCH[0] += 1  # the optimizers' step plans are rebuilt (plan.py): runs found, states moved into flat buffers
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        by_key.setdefault((p.device, p.dtype), []).append(p)
    buffers = []
    for (device, dtype), members in by_key.items():
        step = max(1, align // dtype.itemsize)
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total += -(-p.numel() // step) * step
        flat = FlatBuffer(device, dtype, members, offsets, [p.shape for p in members],
                          _aligned_zeros(total, dtype, device, align), _aligned_zeros(total, dtype, device, align))
        for i, p in enumerate(members):
            slot = _slot(flat.param_buffer, offsets[i], p.shape)
            slot.copy_(p.data)
            had_grad = p.grad is not None
            if had_grad:
                grad = flat.grad_view(i)
                grad.copy_(p.grad)
            p.data = slot
            if had_grad:
                p.grad = grad
            setattr(p, ATTR, _Tag(flat, i))
            if not had_grad:
                flat.adopt_next_grad(i)
        buffers.append(flat)
    return buffers


# ---- the optimizer side --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _native_slot_check():
    try:
        from . import _C
    except Exception:  # built without the extension: FlatRun.valid's Python check
        return None
    return getattr(_C, "SlotCheck", None)



def declined(where: str, count: int, why: str) -> None:
    """Say that flattened params are stepped per tensor (correct, but not the one range flattening is for)."""
    warn(f"the {count} flattened params of {where} are stepped per tensor, not as one range: {why}")


def find_run(params: list[Tensor], options: PartOptions, where: str = "a partition") -> FlatRun | None:
    """The flat run these params (one partition's, in its order) form, or None: they must be consecutive slots of
    one FlatBuffer, in buffer order, each still a view of its slot. `options`: the partition's PartOptions
    (stochastic rounding draws its bits per tensor and element index, so a range would round differently: declined;
    so is differentiable, which only the reference backend's per-tensor autograd runs). Flattened params that form
    no run are said (declined), once per plan build."""
    if not params or options.stochastic_rounding or options.differentiable:
        return None
    tag = getattr(params[0], ATTR, None)
    if tag is None or tag.flat is None:
        return None
    flat, first = tag.flat, tag.index
    if flat.dtype.is_complex:  # a partition holds view_as_real views of complex params, not the params
        return None
    last = first + len(params)
    if last > len(flat) or not all(map(operator.is_, params, flat.params[first:last])):
        declined(where, len(params), "they are not consecutive slots of one buffer (a param without a grad, e.g. "
                 "unused by the backward pass, is skipped as torch skips it, and splits the slots; so do params "
                 "listed in another order than flattened)")
        return None
    if not _all_at(params, flat.param_ptrs[first:last], flat.numels[first:last], flat.dtypes[first:last]):
        declined(where, len(params), "a param's .data was replaced after flattening (call flatten_parameters "
                 "again to move it back into a buffer)")
        return None
    return FlatRun(flat, first, len(params), options)


@dataclass(eq=False)
class FlatRun:
    """Consecutive slots first .. first+count-1 of a FlatBuffer, stepped as one range: param and grad are the
    range of the buffers, and the states (made by states()) are flat buffers of the range's layout whose views
    are the params' state tensors. `steps` holds every param's step count (state["step"] is steps[i]); the kernel
    reads and bumps steps[0] and stepped() copies it to the others."""

    flat: FlatBuffer
    first: int
    count: int
    options: PartOptions  # the partition's
    lo: int = 0
    hi: int = 0
    buffers: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # state key -> flat state buffer
    steps: Tensor | None = None
    _views: list[dict[str, Tensor]] = dataclasses.field(default_factory=list)
    _expected: tuple = ()  # (data_ptrs, numels, dtypes) of the state views, in _tensors' order
    _tensors: list[Tensor] = dataclasses.field(default_factory=list)
    _params: list[Tensor] = dataclasses.field(default_factory=list)
    _slots: tuple = ()  # (param_ptrs, grad_ptrs, numels, dtypes) of the run's slots
    _warned: set = dataclasses.field(default_factory=set)  # what valid() has said (once each)
    _steps_version: int = -1
    _steps_pairs: tuple = ()  # (steps[1:], steps[:-1]) where the counts live on the host
    _native: tuple | None = None  # _C.SlotCheck of params, grads, states (NOTE [flat slot check]), where built

    def __repr__(self) -> str:
        last = self.first + self.count - 1
        return f"FlatRun(slots {self.first}..{last} of {self.flat}, elements {self.lo}..{self.hi})"

    def __post_init__(self) -> None:
        f = self.flat
        self.lo = f.offsets[self.first]
        self.hi = f.offsets[self.first + self.count - 1] + f.shapes[self.first + self.count - 1].numel()

    @property
    def params(self) -> list[Tensor]:
        return self.flat.params[self.first: self.first + self.count]

    @property
    def param(self) -> Tensor:
        return self.flat.param_buffer[self.lo: self.hi]

    @property
    def grad(self) -> Tensor:
        return self.flat.grad_buffer[self.lo: self.hi]

    def _keys(self) -> dict[str, torch.dtype]:
        o = self.options
        keys = {"exp_avg": o.state_dtype, "exp_avg_sq": o.state_dtype}
        if o.amsgrad:
            keys["max_exp_avg_sq"] = o.state_dtype
        if o.master:
            keys["master_param"] = torch.float32
        return keys

    @torch.no_grad()
    def states(self, state) -> list[dict[str, Tensor]] | None:
        """Make the flat state buffers and, per param, the views its state tensors are to be (what
        state.param_state takes as `packed`: it fills the missing entries from them). A state that exists already
        (loaded, or made before flattening) is copied into its view, and its entry replaced by the view. Returns
        None, having changed nothing, where the params' step counts differ (one counter cannot step them) or an
        existing state is not a tensor of the param's shape."""
        params = self.params
        keys = self._keys()
        counts = set()
        for i, p in enumerate(params):
            st = state.get(p) or {}
            if "step" in st:
                s = st["step"]
                if not is_count(s) or (torch.is_tensor(s) and s.numel() != 1):
                    return None  # (state.param_state raises naming it)
                counts.add(float(s.item() if torch.is_tensor(s) else s))
            elif st:
                return None
            for key in keys:
                v = st.get(key)
                if v is not None and not (torch.is_tensor(v) and v.shape == p.shape and v.layout == torch.strided
                                          and v.is_floating_point()):
                    return None  # (state.param_state raises naming it, or converts a float of another width)
        if len(counts) > 1 or (counts and any(not state.get(p) for p in params)):
            return None
        o = self.options
        n = self.hi - self.lo
        device = self.flat.device
        self.buffers = {key: _aligned_zeros(n, dtype, device, 64) for key, dtype in keys.items()}
        self.steps = torch.full((len(params),), counts.pop() if counts else 0.0, dtype=torch.float32,
                                device=device if o.capturable else "cpu")
        views = []
        for i, p in enumerate(params):
            off = self.flat.offsets[self.first + i] - self.lo
            mine = {key: _slot(buf, off, p.shape) for key, buf in self.buffers.items()}
            mine["step"] = self.steps[i]
            st = state.get(p)
            if st:
                for key in keys:
                    if key in st:
                        mine[key].copy_(st[key])
                        st[key] = mine[key]
                st["step"] = mine["step"]
            views.append(mine)
        self._views = views
        return views

    def bind(self, sts: list[dict[str, Tensor]]) -> bool:
        """After the optimizer made the states from states()' views: True if every state tensor is the view
        (it then records what valid() compares); False: the partition is not stepped flat."""
        if len(sts) != self.count or not self._views:
            return False
        tensors = []
        for st, mine in zip(sts, self._views):
            for key, view in mine.items():
                if st.get(key) is not view:
                    return False
                tensors.append(view)
        f, first, last = self.flat, self.first, self.first + self.count
        self._params = self.params
        self._slots = (f.param_ptrs[first:last], f.grad_ptrs[first:last], f.numels[first:last], f.dtypes[first:last])
        self._tensors = tensors
        self._expected = ([t.data_ptr() for t in tensors], [t.numel() for t in tensors], [t.dtype for t in tensors])
        self._steps_version = self.steps._version
        self._steps_pairs = (self.steps[1:], self.steps[:-1]) if self.steps.device.type == "cpu" else ()
        self._views = []
        native = _native_slot_check()
        if native is not None:  # NOTE [flat slot check] in csrc/ops.cpp: the same checks, in C++
            p_ptrs, g_ptrs, numels, _ = self._slots
            state_ptrs, state_numels, _ = self._expected
            self._native = (native(self._params, p_ptrs, numels), native(self._params, g_ptrs, numels, grads=True),
                            native(self._tensors, state_ptrs, state_numels))
        return True

    def partition(self, part):
        """The partition the backend steps instead of `part` while valid(): the same options, each list one tensor
        long (the ranges; steps[0] as the step count). A copy of `part` (a plan.Partition dataclass) with the lists
        replaced; the backend prepares it as any other."""
        b = self.buffers
        return dataclasses.replace(
            part, index=None, params=[self.param], exp_avgs=[b["exp_avg"]], exp_avg_sqs=[b["exp_avg_sq"]],
            max_exp_avg_sqs=[b["max_exp_avg_sq"]] if "max_exp_avg_sq" in b else [], state_steps=[self.steps[0]],
            master_params=[b["master_param"]] if "master_param" in b else [], tensor_ids=part.tensor_ids[:1],
            view_pos=[], reads_grads=False, prepared=None)

    def valid(self) -> bool:
        """The per-step check: True if stepping the range is stepping each param (NOTE [flat buffers]). Every
        param its slot, every grad its view, every state tensor its view, and the step counts equal."""
        params, (p_ptrs, g_ptrs, numels, dtypes) = self._params, self._slots
        if self._native is not None:
            params_at, grads_at, states_at = self._native
            in_place = params_at() and states_at()
            grads_in_place = in_place and grads_at()
        else:
            in_place = _all_at(params, p_ptrs, numels, dtypes) and _all_at(self._tensors, *self._expected)
            grads_in_place = in_place and _all_at(list(map(_grad, params)), g_ptrs, numels, dtypes)
        # Said once each, else a training loop would run per tensor, unaware, step after step.
        if not in_place:
            if "slots" not in self._warned:
                self._warned.add("slots")
                warn(f"a param of {self.count} flattened params, or one of their state tensors, is no longer a view of "
                     "its slot (its .data replaced, e.g. by module.to(), .half() or a load with assign=True): they "
                     "are stepped per tensor from now on. Call flatten_parameters again to step them as one range.")
            return False
        if not grads_in_place:
            if "grads" not in self._warned:
                self._warned.add("grads")
                warn(f"the grads of {self.count} flattened params are not their grad buffer's views (set to None by "
                     "zero_grad(set_to_none=True), torch's default, or replaced): this step and every one like it "
                     "runs per tensor. Zero them with zero_grad(set_to_none=False) or FlatBuffer.zero_grad() to keep "
                     "the flat step.")
            return False
        if self._steps_pairs:
            # Every count, every step (a few microseconds): one written where the version counter does not see it
            # (through `.data`, numpy, or a backend's kernel stepping the same state) must not be stepped as
            # steps[0]. Still one counter if they are all equal (e.g. every count set to the same value).
            return torch.equal(*self._steps_pairs)
        if self.steps._version != self._steps_version:
            # On a device, comparing would wait for it: a count changed in place is seen through the version
            # counter (a write around it, through `.data` or DLPack, is not).
            if not bool((self.steps == self.steps[0]).all()):
                return False
            self._steps_version = self.steps._version
        return True

    @torch.no_grad()
    def stepped(self) -> None:
        """After the backend stepped partition(): every param's step count is steps[0] (which the kernel bumped,
        unless found_inf skipped the step)."""
        if self.count > 1:
            self.steps[1:].copy_(self.steps[0])
        self._steps_version = self.steps._version
