"""FusedAdam / FusedAdamW: drop-in torch.optim.Adam / AdamW whose step runs on a fused backend.

This file owns what faces torch: the constructor's arguments (checks in args.py), param groups, state_dict and
pickling, and the step wrapper. A step builds or reuses each group's plan (plan.py, NOTE [step plan]) and hands each
partition to its backend (backends/__init__.py: one interface for all); the states live in state.py.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
import re
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, checkpoint, flat, plan as plans
from .args import (EXTENSIONS, check_amp, check_args, check_extensions, check_fused_param, check_group_extensions,
                   check_hyper, check_readable, sparse_grad_error, warn)
from .backends import Amp, Hyper, PartialStep, PartOptions
from .plan import Dispatch, Partition, Plan
from .state import Generation, dtensor_type, kernel_view, packed_states, param_state, rebind

__all__ = ["FusedAdam", "FusedAdamW", "Dispatch"]

log = __import__("logging").getLogger("fused_adam")

_EXTENSION_ITEMS = tuple(EXTENSIONS.items())


_NO_AMP = Amp()


@dataclass(eq=False)
class _StepInputs:
    """What every partition of one step shares: AMP's tensors and the clip coefficient, each moved to a partition's
    device once (amp()), and the grads of every group where clipping read them."""

    grad_scale: Tensor | None
    found_inf: Tensor | None
    clip_coef: Tensor | None = None
    group_grads: list[list[Tensor | None]] | None = None
    moved: dict | None = None  # (id, device) -> the tensor on that device
    rebuilt: bool = False  # a group's plan was built in this step: another group's params may have changed
    first_ids: list[int] | None = None  # each group's first param's index over all groups (first_id(), lazily)

    def first_id(self, groups: list[dict], gi: int) -> int:
        if self.first_ids is None:
            self.first_ids = [0, *itertools.accumulate(len(g["params"]) for g in groups)]
        return self.first_ids[gi]

    def amp(self, device: torch.device) -> Amp:
        if self.grad_scale is None and self.found_inf is None and self.clip_coef is None:
            return _NO_AMP
        return Amp(self._on(device, self.grad_scale), self._on(device, self.found_inf), self._on(device, self.clip_coef))

    def _on(self, device: torch.device, t: Tensor | None) -> Tensor | None:
        if t is None or t.device == device:
            return t
        if self.moved is None:
            self.moved = {}
        key = (id(t), device)
        if key not in self.moved:
            self.moved[key] = t.to(device, non_blocking=True)
        return self.moved[key]


_ENTRY = re.compile(r"\b(?:params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|master_params|state_steps)\[(\d+)\]")


def _name_in_group(e: BaseException, w: _Work) -> None:
    """A native backend's error names an entry by its position in the partition (`exp_avgs[1]`): the message gets
    which param of which group that is (a group of two dtypes has two partitions, each counting from 0)."""
    msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else None
    if msg is None or w.step_part is not w.part or " of group " in msg:
        return
    named = dict.fromkeys((m.group(0), int(m.group(1))) for m in _ENTRY.finditer(msg))  # each entry once, in order
    if named:
        which = "; ".join(f"{entry} is param {w.part.param_index(pos)}" for entry, pos in named)
        e.args = (f"{msg} ({which} of group {w.part.group_index})",)


class _Work(NamedTuple):
    """One backend call of a step: `part` of a plan, and what its backend steps (`step_part`: the partition, or
    its flat run's range partition), with grads (None: the backend reads each param's .grad). checked: its
    backend's check() passed on these arguments in this step (NOTE [all checked first])."""

    part: Partition
    step_part: Partition
    grads: list[Tensor] | None
    hp: Hyper
    amp: Amp
    checked: bool = False


def _not_traced(fn: Callable) -> Callable:
    """torch.compiler.disable(fn), made at its first call: the decorator imports torch._dynamo (~1 s), which
    `import fused_adam` and a step that is never compiled do not need (torch's optimizers do the same)."""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


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
        check_args(lr, betas, eps, weight_decay, foreach, capturable, fused, differentiable)
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)  # (a NumPy integer too; stored as the int the kernels read)
        check_extensions(master_weights, state_dtype, stochastic_rounding, seed, max_grad_norm, differentiable)
        backends.check_name(backend)
        if backend != "auto":
            reason = backends.unavailable(backend)
            if reason is not None:
                raise RuntimeError(
                    f"FusedAdam: backend={backend!r} is unavailable: {reason}. "
                    f"Available backends: {', '.join(backends.available_backends())} (or backend='auto')"
                )
        self._backend = backend
        self._plans: dict[int, Plan] = {}
        self._loaded_masters: set[int] = set()  # ids of params whose master weights came from load_state_dict
        self._masters_checked: set[int] = set()  # those of them this step checked (settled once it writes)
        self._generation = Generation()
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)  # (a NumPy number too)
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
        for gi, group in enumerate(self.param_groups):  # what a step would refuse (a Tensor eps), refused now
            self._hyper(gi, group)
        self._bind_state()

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
        self._loaded_masters = set()
        self._masters_checked = set()
        self._generation = Generation()
        self._bind_state()
        checkpoint.fill_group_defaults(self.param_groups)

    def _bind_state(self) -> None:
        """self.state as a StateDict of this optimizer's generation (NOTE [state generation]); every plan dropped,
        as they may hold the tensors of a dict that was in its place."""
        self.state = self._bound_state = rebind(self.state, self._generation)
        self._plans.clear()

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, each param's state a plain dict (loadable by torch.optim.Adam and without fused_adam)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that everything is checked before anything changes (checkpoint.py), and fp32 masters
        and states kept in a state dtype are not cast to the param's dtype on the way in."""
        checkpoint.load_state_dict(self, state_dict)
        self._loaded_masters = {id(p) for p, st in self.state.items()
                                if isinstance(p, Tensor) and isinstance(st, dict) and "master_param" in st}

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

    def _choose_backend(self, part: Partition):
        skipped: dict[str, str] = {}
        names = backends.candidates(part.device) if self._backend == "auto" else (self._backend,)
        for name in names:
            reason = backends.unavailable(name)
            if reason is None:
                reason = backends.get(name).supports(part)
            if reason is None:
                log.debug("group %d, %s %s: backend %s (skipped: %s)", part.group_index, part.device, part.dtype, name, skipped)
                return backends.get(name), Dispatch(part.device, part.dtype, name, skipped, len(part))
            skipped[name] = reason
        if self._backend != "auto":
            raise RuntimeError(
                f"FusedAdam: backend={self._backend!r} cannot run param group {part.group_index} "
                f"(params of dtype {part.dtype} on {part.device}): {skipped[self._backend]}. "
                f"Available backends: {', '.join(backends.available_backends())} (or backend='auto')"
            )
        raise RuntimeError(f"FusedAdam: no backend can run {part.dtype} params on {part.device}: {skipped}")

    def _plan_key(self, group: dict[str, Any]) -> tuple:
        get = group.get
        return (group["amsgrad"], group["capturable"], group["differentiable"], group["maximize"],
                group["decoupled_weight_decay"], group["weight_decay"] != 0, isinstance(group["lr"], Tensor),
                self.max_grad_norm is not None, flat.EPOCH[0], *[get(k, v) for k, v in _EXTENSION_ITEMS])

    def _make_states(self, group: dict[str, Any], opts, members: list[Tensor], run=None) -> list[dict[str, Tensor]]:
        if group["fused"]:
            for p in members:
                if not self.state.get(p):
                    check_fused_param(p)
        if self._loaded_masters:
            self._check_loaded_masters(group, opts, members)
        if run is not None and not self._listed_once(members):
            run = None  # its slots would be stepped once, with one counter: per tensor, in listing order, as torch
        packed = run.states(self.state) if run is not None else None  # NOTE [flat run wiring]
        if run is not None and packed is None:
            flat.declined(f"param group {self._index_of(group)[0]}", len(members),
                          "their states are not alike (step counts that differ, some params with state and some "
                          "without, e.g. resumed from a checkpoint where a param had none): one counter cannot step "
                          "them")
        if packed is None:
            packed = packed_states(self.state, opts, members)
        states = []
        for i, p in enumerate(members):
            try:
                states.append(param_state(self.state, p, opts, packed[i]))
            except (KeyError, TypeError, ValueError) as e:  # (the error path: which param of which group, looked up)
                gi, pi = self._index_of(group, p)
                if len(e.args) == 1 and isinstance(e.args[0], str):
                    e.args = (f"{e.args[0]} (param {pi} of group {gi})",)
                raise
        return states

    def _index_of(self, group: dict[str, Any], p: Tensor | None = None) -> tuple[int, int | None]:
        """(group's index, p's index in it) for a message (O(groups + params): error and warning paths only)."""
        gi = next(k for k, g in enumerate(self.param_groups) if g is group)
        return gi, None if p is None else next(k for k, q in enumerate(group["params"]) if q is p)

    def _check_loaded_masters(self, group: dict[str, Any], opts: PartOptions, members: list[Tensor]) -> None:
        """NOTE [loaded masters]: with master weights a param is its master rounded (to nearest, or stochastically:
        one of the two neighbours). A loaded master that does not round to its param belongs to other values: the
        params were changed after the checkpoint was saved (trained on by torch's AdamW, which carries the entry
        along unread, or loaded from another checkpoint). Stepping it would put the params back where they were
        when saved; the master is made from the param instead, as for a param without one, and a warning says so.
        At the plan builds after a load until a step writes (a step that raises before restores the loaded master,
        as it restores every state entry it made: the next one checks it again)."""
        stale = []
        for p in members:
            if id(p) not in self._loaded_masters:
                continue
            self._masters_checked.add(id(p))
            st = self.state.get(p)
            master = st.get("master_param") if isinstance(st, dict) else None
            if (not opts.master or not isinstance(master, Tensor) or type(p) not in (Tensor, torch.nn.Parameter)
                    or p.is_meta or master.is_meta or master.shape != p.shape or master.device != p.device):
                continue
            with torch.no_grad():
                near = master.to(p.dtype)
                fits = p == near
                if opts.stochastic_rounding:
                    away = torch.where(master > near.float(), math.inf, -math.inf).to(p.dtype)
                    fits |= p == torch.nextafter(near, away)
                if not bool(fits.all()):
                    st["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                    stale.append(p)
        if stale:
            gi, first = self._index_of(group, stale[0])
            warn(f"the master weights loaded for {len(stale)} params (param {first} of group {gi} the first) do not "
                 "round to what the params hold: the params changed after the checkpoint was saved (trained on "
                 "without master weights, or loaded from another checkpoint). Their masters are made from the params.")

    def _settle_masters(self) -> None:
        """A step wrote: the loaded masters it checked stay as they are now (NOTE [loaded masters])."""
        if self._masters_checked:
            self._loaded_masters -= self._masters_checked

    def _listed_once(self, params: list[Tensor]) -> bool:
        """No param of `params` is listed again, in its group or another (O(params of the optimizer), at a plan
        build that found a flat run only)."""
        ids = {id(p) for p in params}
        return sum(id(p) in ids for group in self.param_groups for p in group["params"]) == len(ids)

    def _runs_listed_once(self, plan: Plan) -> bool:
        return all(self._listed_once(part.flat.params) for part in plan.parts if part.flat is not None)

    def _build_plan(self, gi: int, group: dict[str, Any], has_grad: list[bool], key: tuple) -> Plan:
        if not isinstance(group["params"], (list, tuple)):  # (a set has no order to step in, a generator no second pass)
            raise TypeError(f"FusedAdam: param_groups[{gi}]['params'] is a {type(group['params']).__name__}; expected "
                            "a list of tensors (as add_param_group makes it)")
        first_id = sum(len(g["params"]) for g in self.param_groups[:gi])  # params' index over all groups
        with torch.no_grad():
            plan = plans.build(gi, group, has_grad, key, first_id, self.max_grad_norm is not None,
                               self._choose_backend, self._make_states)
        plan.generation = self._generation.value  # its own states made (replacing one bumps it: NOTE [state generation])
        return plan

    @torch.no_grad()
    def _clip_coef(self, group_grads: list[list[Tensor | None]], grad_scale: Tensor | None) -> Tensor | None:
        """torch.nn.utils.clip_grad_norm_'s coefficient over every grad of the optimizer, as a tensor (no host
        synchronisation): one multi-tensor norm pass reads the grads; the Adam pass applies the coefficient."""
        grads = [g for grads in group_grads for g in grads if g is not None]
        check_readable(group_grads)  # the norm reads them before any per-tensor check
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, dtensor_type()):
            total = total.full_tensor()  # the shards' partial norms, reduced
        if grad_scale is not None:
            total = total / grad_scale.to(total.device)  # the norm of the unscaled grads
        self.grad_norm = total
        return torch.clamp(self.max_grad_norm / (total.float() + 1e-6), max=1.0)

    def _hyper(self, group_index: int, group: dict[str, Any]) -> Hyper:
        """A group's hyperparameters for this step, every option it reads checked as the constructor checks it."""
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = check_hyper(group_index, lr, group["betas"], eps, weight_decay)
        check_group_extensions(group_index, group, self.max_grad_norm)
        return Hyper(_scalar(lr), _scalar(beta1), _scalar(beta2), eps, weight_decay)

    @staticmethod
    def _part_grads(part: Partition, grads: list[Tensor]) -> list[Tensor]:
        gs = grads if part.index is None else [grads[i] for i in part.index]
        if any(g.layout != torch.strided for g in gs):
            for pos, g in enumerate(gs):
                if g.layout != torch.strided:
                    raise sparse_grad_error(part.param_index(pos), part.group_index)
        if part.view_pos:
            gs = list(gs)
            for pos in part.view_pos:
                gs[pos] = kernel_view(gs[pos])
        return gs

    def _group_work(self, gi: int, group: dict[str, Any], hp: Hyper, ctx: _StepInputs,
                    read_grads: bool = True) -> list[_Work]:
        """What this step does to group gi: one _Work per partition, the plan built or rebuilt where it is not
        valid. read_grads: a valid plan whose one partition can read the grads itself gets grads=None (no Python
        list of grads); its backend then says, having changed nothing, whether every param had one."""
        params = group["params"]
        key = self._plan_key(group)
        plan = self._plans.get(gi)
        valid = plan is not None and plan.valid(params, key, self._generation.value, self.state)
        if valid and (plan.uses_ids and plan.first_id != ctx.first_id(self.param_groups, gi)
                      or ctx.rebuilt and plan.has_flat and not self._runs_listed_once(plan)):
            valid = False  # another group's params list changed: stochastic rounding's ids, or a flat run's param
            # now listed there too, which one counter cannot step (found before any group steps: groups in order)
        clipping = ctx.group_grads is not None
        if valid and not clipping and plan.all_grads and plan.all_flat and all([part.flat.valid() for part in plan.parts]):
            # Flat runs (NOTE [flat run wiring]) read no grad list either, where the plan covers every param.
            return [_Work(part, part.flat_part, [part.flat.grad], hp, ctx.amp(part.device)) for part in plan.parts]
        if read_grads and valid and not clipping and len(plan.parts) == 1 and plan.parts[0].reads_grads:
            part = plan.parts[0]
            return [_Work(part, part, None, hp, ctx.amp(part.device))]
        grads = ctx.group_grads[gi] if clipping else [p.grad for p in params]
        has_grad = [g is not None for g in grads]
        if not valid or plan.has_grad != has_grad:
            plan = self._plans[gi] = self._build_plan(gi, group, has_grad, key)
            ctx.rebuilt = True
        work = []
        for part in plan.parts:
            amp = ctx.amp(part.device)
            if part.flat is not None and part.flat.valid():
                work.append(_Work(part, part.flat_part, [part.flat.grad], hp, amp))
            else:
                work.append(_Work(part, part, self._part_grads(part, grads), hp, amp))
        return work

    def _all_checked(self, work: list[_Work], ctx: _StepInputs) -> list[_Work]:
        """NOTE [all checked first]: a step of several partitions (groups, dtypes, devices) checks every one before
        it writes any, so that a bad tensor in one leaves every param and state as it was (each backend's step
        checks its own partition before it writes; the first partition's check is that one). The later ones are
        stepped with checked=True: the CPU backend steps on what its check found (its data passes in between
        evict what a second pass would read), the others run their pass again on metadata still in cache, where
        nothing has moved since (NOTE [pass cache]). A partition offered grads=None whose params lack a grad takes
        its group's grads list instead."""
        ready = work[:1]  # (if the first reads its grads and a param has none, _run takes its group's list)
        for w in work[1:]:
            items = [w]
            if w.grads is None:
                try:
                    read = w.part.backend.check(w.part, None, w.hp, w.amp)
                except (RuntimeError, TypeError, ValueError):
                    read = False  # checked again below with the group's grads (raised again there, or stepped)
                if read:
                    ready.append(w._replace(checked=True))
                    continue
                gi = w.part.group_index
                items = self._group_work(gi, self.param_groups[gi], w.hp, ctx, read_grads=False)
            for x in items:
                try:
                    x.part.backend.check(x.step_part, x.grads, x.hp, x.amp)
                except (RuntimeError, TypeError, ValueError) as e:
                    _name_in_group(e, x)
                    raise
                ready.append(x._replace(checked=True))
        return ready

    def _forget_moved_plans(self) -> bool:
        """After a step raised before writing anything: a param whose dtype or device changed under its plan
        (`p.data = p.data.double()`, a module moved after the optimizer was made) belongs to another partition,
        and torch's for-loop steps it where its states agree. Drops those plans (the step is then tried once
        more); True if there were any. O(params), on this error path only."""
        moved = []
        for gi, plan in self._plans.items():
            changed = [p for part in plan.parts for p in part.params if p.dtype != part.dtype or p.device != part.device]
            if changed and all(self._states_follow(p, self.param_groups[gi]) for p in changed):
                moved.append(gi)
        for gi in moved:
            del self._plans[gi]
        return bool(moved)

    def _states_follow(self, p: Tensor, group: dict[str, Any]) -> bool:
        """p's moments have the dtype and device its new partition steps them in (else the step's error stands,
        as torch's for-loop raises on them)."""
        want = PartOptions.of(group, p.dtype, self.max_grad_norm is not None).state_dtype
        st = self.state.get(p) or {}
        return all(st[k].dtype == want and st[k].device == p.device
                   for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if torch.is_tensor(st.get(k)))

    def _run(self, w: _Work, ctx: _StepInputs) -> None:
        part = w.part
        if w.grads is None:
            try:
                if part.backend.step(part, None, w.hp, w.amp, w.checked):
                    return
            except PartialStep:
                raise
            except (RuntimeError, TypeError, ValueError):
                pass  # raised before writing anything: the path below steps (a param without a grad skipped, the
                # plan rebuilt) or raises it again, worded as torch's
            gi = part.group_index
            items = self._group_work(gi, self.param_groups[gi], w.hp, ctx, read_grads=False)
            for x in self._all_checked(items, ctx) if len(items) > 1 else items:
                self._run(x, ctx)
            return
        try:
            part.backend.step(w.step_part, w.grads, w.hp, w.amp, w.checked)
        except (RuntimeError, TypeError, ValueError) as e:
            _name_in_group(e, w)
            raise
        if w.step_part is not part:
            part.flat.stepped()

    # NOTE [torch.compile]: a compiled training step runs the optimizer step eagerly (one graph break). Tracing
    # the step would bake lr, the step counts and the plan's Python decisions into guards: a scheduler changing
    # lr would recompile every step, and the plan cache's bookkeeping does not trace. The kernels do the work
    # either way; what the graph break costs is one return to Python per training step. In eager code the step
    # does not go through the disable wrapper (a sixth of a small step's fixed cost).
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

    @_not_traced
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
        if self.state is not self._bound_state:  # a dict put in its place (`opt.state = defaultdict(dict)`, a reset)
            self._bind_state()
        check_amp("grad_scale", grad_scale)
        check_amp("found_inf", found_inf)
        if grad_scale is not None and grad_scale.dim():  # (a view: a captured step reads the same memory)
            grad_scale = grad_scale.reshape(())  # shape (1,) would broadcast a 0-dim grad to (1,)
        if found_inf is not None and found_inf.dim():
            found_inf = found_inf.reshape(())
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            hypers = [self._hyper(gi, group) for gi, group in enumerate(self.param_groups)]  # all checked first
            ctx = _StepInputs(grad_scale, found_inf)
            if self.max_grad_norm is not None:
                ctx.group_grads = [[p.grad for p in group["params"]] for group in self.param_groups]
                ctx.clip_coef = self._clip_coef(ctx.group_grads, grad_scale)
            self._generation.journal = []  # NOTE [state journal]: until the first write
            try:
                for retry in (False, True):
                    try:  # everything up to the first write: the checks, and the first partition's step (its own)
                        work = [w for gi, group in enumerate(self.param_groups)
                                for w in self._group_work(gi, group, hypers[gi], ctx)]
                        if len(work) > 1:
                            work = self._all_checked(work, ctx)
                        if work:
                            self._run(work[0], ctx)
                    except PartialStep:
                        self._generation.journal = None  # (the states it made are in use now)
                        self._settle_masters()
                        raise
                    except Exception:
                        if retry or not self._forget_moved_plans():
                            self._generation.rollback()
                            raise
                        continue
                    self._generation.journal = None
                    self._settle_masters()
                    for w in work[1:]:
                        self._run(w, ctx)
                    break
            finally:
                self._generation.journal = None
                if self._masters_checked:
                    self._masters_checked.clear()
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
