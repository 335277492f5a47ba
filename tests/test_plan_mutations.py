"""A step plan never goes stale (NOTE [step plan] in plan.py): every change that torch's for-loop sees between two
steps is seen, on every backend that runs here. Each case trains FusedAdamW and torch.optim.AdamW(foreach=False)
side by side, applies the same change to both at step 3, and compares params and every state tensor after each
step (bitwise on the reference backend, which is torch's for-loop op for op)."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict, defaultdict

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from parity import backends_here, make_grads, make_params

SHAPES = [(7,), (3, 5), (4,), (2, 3), (1,)]
STEPS = 6
MUTATE_AT = 3


def _pair(backend, shapes=SHAPES, **kwargs):
    params0 = make_params(torch.float32, shapes)
    ours_p = [torch.nn.Parameter(p.clone()) for p in params0]
    ref_p = [torch.nn.Parameter(p.clone()) for p in params0]
    kw = dict(lr=0.01, weight_decay=0.1) | kwargs
    ref_kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return (FusedAdamW(ours_p, backend=backend, **kw), torch.optim.AdamW(ref_p, foreach=False, **ref_kw))


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _set_grads(opt, step):
    ps = _params(opt)
    for p, g in zip(ps, make_grads(ps, step)):
        p.grad = g


def _assert_same(ours, ref, backend, where=""):
    tol = dict(atol=0, rtol=0) if backend == "reference" else {}
    pa, pb = _params(ours), _params(ref)
    assert len(pa) == len(pb)
    for i, (a, b) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"{where} param {i}: {m}")
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sa) == set(sb), (where, i, set(sa), set(sb))
        for k in sb:
            x, y = sa[k], sb[k]
            if k == "step":
                x, y = x.float().cpu(), y.float().cpu()
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{where} {k} of param {i}: {m}")


def _stepped(*opts, steps: int = 2) -> None:
    """Each optimizer stepped `steps` times on _set_grads' grads (states made, plans built)."""
    for s in range(steps):
        for opt in opts:
            _set_grads(opt, s)
            opt.step()


def _run(ours, ref, backend, mutate, steps=STEPS, grads=_set_grads):
    for s in range(steps):
        if s == MUTATE_AT:
            mutate(ours)
            mutate(ref)
        for opt in (ours, ref):
            grads(opt, s)
            opt.step()
        _assert_same(ours, ref, backend, where=f"step {s}:")


def _replace_param(opt):
    group = opt.param_groups[0]
    old = group["params"][1]
    group["params"][1] = torch.nn.Parameter(old.detach() * 0.5 + 1)  # a new param in the same slot


def _append_param(opt):
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.linspace(-1, 1, 9)))


def _remove_param(opt):
    opt.param_groups[0]["params"].pop(2)


def _swap_params(opt):
    ps = opt.param_groups[0]["params"]
    ps[0], ps[2] = ps[2], ps[0]


def _new_params_list(opt):
    opt.param_groups[0]["params"] = list(reversed(opt.param_groups[0]["params"]))


def _param_data_same_shape(opt):
    p = opt.param_groups[0]["params"][1]
    p.data = p.data * 2 + 0.25  # a new storage, same shape


def _state_replaced(opt):
    p = opt.param_groups[0]["params"][0]
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"] * 3  # a new tensor


def _state_data_assigned(opt):
    p = opt.param_groups[0]["params"][1]
    opt.state[p]["exp_avg_sq"].data = opt.state[p]["exp_avg_sq"] * 4  # the same tensor object, a new storage


def _state_dict_replaced(opt):
    p = opt.param_groups[0]["params"][3]
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _state_deleted(opt):
    del opt.state[opt.param_groups[0]["params"][4]]  # its states start again from zero, as torch's do


def _optimizer_state_replaced(opt):
    opt.state = defaultdict(dict)  # a reset: every state starts again from zero


# Dict methods that do not go through __setitem__ / __delitem__, one by one.
def _state_update(opt):
    p = opt.param_groups[0]["params"][0]
    opt.state.update({p: {k: v * 2 for k, v in opt.state[p].items()}})


def _state_ior(opt):
    p = opt.param_groups[0]["params"][1]
    state = opt.state
    state |= {p: {k: v + 1 for k, v in opt.state[p].items()}}


def _param_state_ior(opt):
    st = opt.state[opt.param_groups[0]["params"][2]]
    st |= {"exp_avg": st["exp_avg"] * -1}


def _state_popitem(opt):
    opt.state.popitem()  # the last param's (torch's for-loop raises KeyError where one entry of a state is missing)


def _steps_in_place(opt):
    ps = opt.param_groups[0]["params"]
    opt.state[ps[0]]["step"].fill_(10)
    opt.state[ps[2]]["step"].add_(5)


def _moments_in_place(opt):
    ps = opt.param_groups[0]["params"]
    opt.state[ps[1]]["exp_avg"].mul_(-2)
    opt.state[ps[3]]["exp_avg_sq"].add_(0.5)


def _hyperparameters(opt):
    g = opt.param_groups[0]
    g["lr"] = 0.003
    g["betas"] = (0.8, 0.95)
    g["eps"] = 1e-3


def _weight_decay_off(opt):
    opt.param_groups[0]["weight_decay"] = 0.0


def _maximize_on(opt):
    opt.param_groups[0]["maximize"] = True


def _group_added(opt):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.arange(6.0).view(2, 3) / 7)], "lr": 0.02})


def _state_dict_reloaded(opt):
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.005
    for s in sd["state"].values():
        s["exp_avg"] = s["exp_avg"] * 0.5
    opt.load_state_dict(sd)


def _param_and_states_reshaped(opt):
    """A param and its states all replaced by tensors of another size: consistent, so torch steps it."""
    p = opt.param_groups[0]["params"][0]
    p.data = torch.linspace(-2, 2, 11)
    st = opt.state[p]
    for k in ("exp_avg", "exp_avg_sq"):
        st[k].data = torch.full((11,), 0.01 if k == "exp_avg" else 0.001)


def _param_and_states_to_another_dtype(opt):
    """A param and its states all converted to float64 (by hand; load_state_dict casts the same way): consistent,
    so torch steps it, and so must the plan (it belongs to another partition now)."""
    p = opt.param_groups[0]["params"][1]
    p.data = p.data.double()
    st = opt.state[p]
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if k in st:
            st[k].data = st[k].double()


MUTATIONS = {
    "param replaced in the list": _replace_param,
    "param appended": _append_param,
    "param removed": _remove_param,
    "params swapped": _swap_params,
    "params list replaced": _new_params_list,
    "param .data replaced": _param_data_same_shape,
    "param and states reshaped": _param_and_states_reshaped,
    "param and states to another dtype": _param_and_states_to_another_dtype,
    "state tensor replaced": _state_replaced,
    "state .data assigned": _state_data_assigned,
    "state dict replaced": _state_dict_replaced,
    "state deleted": _state_deleted,
    "optimizer.state replaced": _optimizer_state_replaced,
    "state.update": _state_update,
    "state |=": _state_ior,
    "a param's state |=": _param_state_ior,
    "state.popitem": _state_popitem,
    "step counts in place": _steps_in_place,
    "moments in place": _moments_in_place,
    "hyperparameters": _hyperparameters,
    "weight decay off": _weight_decay_off,
    "maximize on": _maximize_on,
    "param group added": _group_added,
    "load_state_dict": _state_dict_reloaded,
}


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_seen(backend, name):
    ours, ref = _pair(backend)
    _run(ours, ref, backend, MUTATIONS[name])


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("shapes", [[(7,)], SHAPES], ids=["one param", "every param"])
def test_every_param_and_state_to_another_dtype_steps_as_torch(backend, shapes):
    """Every param of a partition and its states converted to float64 together: the pass, which compares the
    tensors with each other, finds them consistent, but the partition's kernel was made for float32 (on the triton
    backend this stepped float32 memory as float64, out of bounds). The plan follows them, as torch's for-loop does."""

    def to_double(opt):
        for p in _params(opt):
            p.data = p.data.double()
            for k in ("exp_avg", "exp_avg_sq"):
                opt.state[p][k].data = opt.state[p][k].double()

    def grads(opt, step):
        ps = _params(opt)
        for p, g in zip(ps, make_grads(ps, step)):
            p.grad = g.to(p.dtype)

    ours, ref = _pair(backend, shapes=shapes)
    _run(ours, ref, backend, to_double, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
def test_a_param_in_and_out_of_another_layout_steps_as_torch(backend):
    """A square param transposed in place of its `.data` (its states keep theirs: the arrays are stepped on
    copies of one layout), then made contiguous again: every step lands in the tensors as they are then (the
    triton backend kept the copies' addresses for the states, which had not moved, and stepped the copies)."""
    shapes = [(4, 4), (3, 3), (5,)]

    def transpose(opt):
        for p in _params(opt)[:2]:
            p.data = p.data.t()

    def grads(opt, step):
        if step == MUTATE_AT + 1:
            for p in _params(opt)[:2]:
                p.data = p.data.contiguous()
        _set_grads(opt, step)

    ours, ref = _pair(backend, shapes=shapes)
    _run(ours, ref, backend, transpose, steps=STEPS + 1, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("what", ["param", "exp_avg"])
def test_complex_data_replaced_steps_as_torch(backend, what):
    """A complex param is stepped through a real view of it (view_as_real, held by the plan); after `.data` is
    replaced on the param or on a state, that view is of the old memory, which no check of the view can see: the
    plan makes new views, and the step lands where torch's for-loop puts it."""

    def mutate(opt):
        p = opt.param_groups[0]["params"][1]
        t = p if what == "param" else opt.state[p]["exp_avg"]
        t.data = t.data * 2 + 0.25

    def grads(opt, step):
        ps = _params(opt)
        for p, g in zip(ps, make_grads([torch.view_as_real(p) for p in ps], step)):
            p.grad = torch.view_as_complex(g)

    params0 = make_params(torch.float32, [(3, 2), (7, 2), (4, 2)])
    ours_p = [torch.nn.Parameter(torch.view_as_complex(p.clone())) for p in params0]
    ref_p = [torch.nn.Parameter(torch.view_as_complex(p.clone())) for p in params0]
    ours = FusedAdamW(ours_p, backend=backend, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, foreach=False, lr=0.01, weight_decay=0.1)
    _run(ours, ref, backend, mutate, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
def test_tensor_lr_filled_in_place(backend):
    ours, ref = _pair(backend, lr=torch.tensor(0.01))
    _run(ours, ref, backend, lambda opt: opt.param_groups[0]["lr"].fill_(0.002))


def _grads_changing(opt, step):
    """Grads that disappear (step 3), reappear, and change layout (a transposed-contiguous grad at step 4, a new
    grad tensor every step)."""
    ps = _params(opt)
    for i, (p, g) in enumerate(zip(ps, make_grads(ps, step))):
        if i == 1 and step == 3:
            p.grad = None
        elif i == 1 and step == 4:
            p.grad = g.t().contiguous().t()  # same values, other strides
        elif i == 2 and step >= 4:
            p.grad = None
        else:
            p.grad = g


@pytest.mark.parametrize("backend", backends_here())
def test_grads_appear_disappear_and_change_layout(backend):
    ours, ref = _pair(backend)
    _run(ours, ref, backend, lambda opt: None, grads=_grads_changing)


@pytest.mark.parametrize("backend", backends_here())
def test_new_grads_among_hundreds_step_as_torch(backend):
    """NOTE [pass cache]: a grad set to a new tensor like the last moves only its address, which the scan keeps and
    takes once every check has passed. 300 params (the scan runs in both threads), and at every step new grads for
    all of them, for every third, or for one, one of them transposed (a full check) among the address-only moves;
    against torch's for-loop."""
    ours, ref = _pair(backend, shapes=[(3,), (2, 2), (5,)] * 100)

    def grads(opt, step):
        ps = _params(opt)
        fresh = make_grads(ps, step)
        for i, (p, g) in enumerate(zip(ps, fresh)):
            if step == 0 or step % 3 == 0 or (step % 3 == 1 and i % 3 == 0) or i == 151:
                p.grad = g.t().contiguous().t() if (i == 151 and step % 2) else g  # 151: (2, 2)
            else:  # a grad kept, written in place
                p.grad.copy_(g)

    _run(ours, ref, backend, lambda opt: None, steps=5, grads=grads)


def _assert_step_raises_and_changes_nothing(opt, errors, match):
    tensors = lambda: _params(opt) + [v for p in _params(opt) for v in opt.state[p].values()]  # noqa: E731
    before = [t.clone() for t in tensors()]
    with pytest.raises(errors, match=match):
        opt.step()
    for i, (a, b) in enumerate(zip(before, tensors())):
        assert torch.equal(a, b), f"tensor {i} changed"


@pytest.mark.parametrize("backend", backends_here())
def test_param_data_of_another_shape_raises_and_changes_nothing(backend):
    """torch's for-loop raises on a param whose states have another shape; so do we, before writing anything."""
    ours, _ = _pair(backend)
    _stepped(ours)
    p = ours.param_groups[0]["params"][0]
    p.data = torch.randn(8)
    _set_grads(ours, 2)
    _assert_step_raises_and_changes_nothing(ours, (RuntimeError, ValueError), r"shape|size")


# Every other shape of a (24, 30) param's 720 elements in 2-d, some in 1-d and 3-d: the same memory at the same
# address, only sizes and strides differ from what the check pass saw (NOTE [pass cache]: its digest of each array's
# metadata must see each of them).
SAME_MEMORY_SHAPES = [(a, 720 // a) for a in range(1, 721) if 720 % a == 0 and a != 24] + [
    (720,), (2, 3, 120), (6, 10, 12), (9, 8, 10)]


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("victim", ["param", "exp_avg"])
def test_same_memory_viewed_as_another_shape_raises_and_changes_nothing(backend, victim):
    """A param (with its grad) or a moment viewed in place as another shape of its elements: torch's for-loop
    raises on the mismatch with the other arrays; so do we, before writing anything, for every such shape."""
    for shape in SAME_MEMORY_SHAPES:
        ours, _ = _pair(backend, shapes=[(24, 30), (5,)])
        _stepped(ours)
        p = ours.param_groups[0]["params"][0]
        _set_grads(ours, 2)
        t = p if victim == "param" else ours.state[p]["exp_avg"]
        address = t.data_ptr()
        t.data = t.data.view(shape)
        if victim == "param":
            p.grad = p.grad.view(shape)
        assert t.data_ptr() == address
        _assert_step_raises_and_changes_nothing(ours, (RuntimeError, ValueError), r"shape|size")


@pytest.mark.parametrize("backend", backends_here())
def test_arrays_shrunk_in_place_with_size_one_strides_step_as_torch(backend):
    """A param, its grad and its moments shrunk in place from 4 elements to 2 at the same address, with the strides
    of their size-1 dims changed too (torch lets them be anything): the values a hunt solved for to cancel the
    change in a digest with keys known from the source (NOTE [pass cache]). Stepped as torch steps the 2 elements;
    the 2 floats after them are not written."""
    before = ((4,) + (1,) * 7, (1,) + (1000,) * 7)
    after = ((2,) + (1,) * 7, (1, 944, 1088, 1146, 752, 909, 1023, 936))
    runs = []
    for make in (lambda ps: FusedAdamW(ps, backend=backend), lambda ps: torch.optim.AdamW(ps, foreach=False)):
        p = torch.nn.Parameter(torch.arange(1.0, 5.0).as_strided(*before))
        opt = make([p])
        p.grad = torch.full((4,), 0.5).as_strided(*before)
        opt.step()
        for t in opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]:
            t.as_strided_(*before)
        opt.step()
        memory = p.detach().as_strided((4,), (1,))
        with torch.no_grad():
            for t in p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]:
                t.as_strided_(*after)
        tail = memory[2:].clone()
        opt.step()
        assert torch.equal(memory[2:], tail), "a float after the shrunk param was written"
        runs.append([p.detach().clone()] + [opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")])
    for ours, ref in zip(*runs):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backend", backends_here())
def test_param_data_of_another_dtype_raises_and_changes_nothing(backend):
    """torch's for-loop raises on a param whose dtype no longer matches its states; so do we, before writing."""
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    p = ours.param_groups[0]["params"][2]
    p.data = p.data.double()
    _set_grads(ours, 1)
    _assert_step_raises_and_changes_nothing(ours, (RuntimeError, TypeError, ValueError), r"dtype|Double|Float")


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("victim", ["params", "grads", "exp_avgs", "state_steps", "state_steps shrunk"])
def test_storage_freed_under_a_tensor_raises_and_changes_nothing(backend, victim):
    """`untyped_storage().resize_(0)` (how FSDP frees a param) leaves a tensor whose elements are nowhere: the step
    names the list and index and writes nothing, where torch's kernels would read and write out of bounds. The step
    counts too (read, then bumped: the shared count buffer shrunk to its first count leaves the others outside)."""
    ours, _ = _pair(backend)
    _stepped(ours)
    _set_grads(ours, 2)
    p = ours.param_groups[0]["params"][1]
    victim_tensor = {"params": p, "grads": p.grad, "exp_avgs": ours.state[p]["exp_avg"]}.get(victim)
    if victim_tensor is None:  # the step counts: views of one buffer
        victim_tensor = ours.state[p]["step"]
    freed = victim_tensor.untyped_storage().data_ptr()  # (the states are views of one packed buffer: all go)
    others = [t for q in _params(ours) for t in (q, *ours.state[q].values()) if t.untyped_storage().data_ptr() != freed]
    before = [t.clone() for t in others]
    keep = 4 if victim.endswith("shrunk") else 0
    victim_tensor.untyped_storage().resize_(keep)
    index = 1 if victim in ("params", "grads") else r"\d+"
    name = victim.split()[0]
    with pytest.raises(RuntimeError, match=rf"{name}\[{index}\].* needs \d+ bytes of storage .* holds {keep}"):
        ours.step()
    for i, (a, b) in enumerate(zip(before, others)):
        assert torch.equal(a, b), f"tensor {i} changed"


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("victim", ["params", "exp_avgs", "grads"])
def test_written_array_with_shared_elements_raises_and_changes_nothing(backend, victim):
    """An array the step writes with two elements at one address (an expanded tensor) would be written twice per
    address, and torch's in-place ops refuse it only once other arrays are written: the step names it first. A grad
    is written only when unscaled (grad_scale); without it an expanded grad is read like any other, as by torch."""
    ours, ref = _pair(backend)
    _stepped(ours, ref)
    row, column = torch.randn(1, 3), torch.randn(2, 1) * 1e-2
    for opt in (ours, ref):
        _set_grads(opt, 2)
        p = opt.param_groups[0]["params"][3]  # (2, 3)
        if victim == "params":
            p.data = row.clone().expand(2, 3)
        elif victim == "exp_avgs":
            opt.state[p]["exp_avg"] = torch.zeros(1, 3).expand(2, 3)
        else:
            p.grad = column.clone().expand(2, 3)
    if victim == "grads":  # read only: steps as torch's for-loop does
        ours.step()
        ref.step()
        _assert_same(ours, ref, backend)
        ours.grad_scale, ours.found_inf = torch.tensor(2.0), torch.tensor(0.0)  # (as GradScaler sets them)
    _assert_step_raises_and_changes_nothing(ours, RuntimeError, rf"{victim}\[3\].* share memory")


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("key, value, error", [
    ("step", torch.tensor([1.0, 2.0]), ValueError), ("step", "x", ValueError), ("exp_avg", 5, TypeError)],
    ids=["step-two-elements", "step-str", "exp_avg-int"])
def test_state_entry_of_the_wrong_kind_raises_and_changes_nothing(backend, key, value, error):
    """A state entry that is no step count or no tensor: an error naming the entry, before anything is written."""
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    p = ours.param_groups[0]["params"][2]
    ours.state[p][key] = value
    def tensors():
        return [t for q in _params(ours) for t in (q, *ours.state[q].values()) if torch.is_tensor(t)]

    before = [t.clone() for t in tensors()]
    with pytest.raises(error, match=rf"state\['{key}'\] of the param of shape \(4,\)"):
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(before, tensors()))


@pytest.mark.parametrize("backend", backends_here())
def test_a_master_param_that_is_no_tensor_raises_and_changes_nothing(backend):
    """master_weights=True and a state['master_param'] set to None: an error naming it (not the binding's signature
    dump, or an AttributeError), before anything is written."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.bfloat16))
    opt = FusedAdamW([p], master_weights=True, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["master_param"] = None
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"state\['master_param'\] of the param of shape \(4,\) is None"):
        opt.step()
    assert torch.equal(before, p.detach())


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("case", ["state-is-another-state", "grad-is-its-param", "grad-is-its-param-later",
                                  "grad-in-its-param-through-numpy-later"])
def test_arrays_sharing_memory_raise_and_change_nothing(backend, case):
    """Two arrays of one param in the same memory (a state loaded as the same tensor as another, a grad set to its
    param): the step reads and writes element by element where torch's for-loop writes whole arrays in turn, so
    neither is an Adam step. An error naming both, before anything is written; also when only the grad's address
    moved since the last step (the pass's cheap path), and when the grad reaches the param's memory through a
    storage of its own (numpy's, like the grad before it: the pass's storage lookup alone does not see it)."""
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    p = ours.param_groups[0]["params"][4]
    if case == "state-is-another-state":
        ours.state[p]["exp_avg_sq"] = ours.state[p]["exp_avg"]
        match = r"exp_avgs\[4\] and exp_avg_sqs\[4\].* share memory"
    else:
        if case == "grad-in-its-param-through-numpy-later":
            p.grad = torch.from_numpy(p.grad.numpy().copy())
        if case != "grad-is-its-param":
            ours.step()
            _set_grads(ours, 2)
        p.grad = torch.from_numpy(p.detach().numpy()) if "numpy" in case else p.detach()
        match = r"params\[4\] and grads\[4\].* share memory"
    _assert_step_raises_and_changes_nothing(ours, RuntimeError, match)


# case -> (change, the error's two arrays), on SHAPES + [(4,)]: (7,), (3, 5), (4,), (2, 3), (1,), (4,)
TWO_PARAMS_SHARING = {
    "grad-is-another-param": (lambda opt, ps: setattr(ps[2], "grad", ps[0].detach()[1:5]), ("params", 0, "grads", 2)),
    "grad-in-another-state": (lambda opt, ps: setattr(ps[4], "grad", opt.state[ps[1]]["exp_avg"].view(-1)[3:4]),
                              ("exp_avgs", 1, "grads", 4)),
    "param-in-another-param": (lambda opt, ps: setattr(ps[4], "data", ps[0].detach()[2:3]), ("params", 0, "params", 4)),
    "state-in-another-state": (
        lambda opt, ps: opt.state[ps[4]].__setitem__("exp_avg", opt.state[ps[0]]["exp_avg"][2:3]),
        ("exp_avgs", 0, "exp_avgs", 4)),
    "step-is-another-step": (lambda opt, ps: opt.state[ps[4]].__setitem__("step", opt.state[ps[0]]["step"]),
                             ("state_steps", 0, "state_steps", 4)),
    # a grad like the last (its storage's size, its offset, shape and strides) in another param's memory: only its
    # address moved, the pass's cheap path, which looks its storage up among those the step writes
    "grad-is-a-param-like-it": (lambda opt, ps: setattr(ps[2], "grad", ps[5].detach()), ("grads", 2, "params", 5)),
}


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("case", TWO_PARAMS_SHARING)
def test_arrays_of_two_params_sharing_memory_raise_and_change_nothing(backend, case):
    """NOTE [arrays apart]: a kernel updates every param of a call at once, torch's for-loop one after the other, so
    with a grad set to another param, or two params or states overlapping, the two disagree (and a kernel's result
    would depend on its threads' timing). An error naming both, before anything is written, at every step until the
    memory is apart again, after which the step is torch's."""
    change, names = TWO_PARAMS_SHARING[case]
    ours, ref = _pair(backend, shapes=SHAPES + [(4,)])  # (param 5 is like param 2)
    _stepped(ours, ref)
    _set_grads(ours, 2)
    ps = _params(ours)
    undo = {k: (p.grad, p.data) for k, p in enumerate(ps)}
    states = {k: dict(ours.state[p]) for k, p in enumerate(ps)}
    change(ours, ps)
    a, i, b, j = names
    match = rf"{a}\[{i}\].* and {b}\[{j}\].* share memory"
    _assert_step_raises_and_changes_nothing(ours, RuntimeError, match)
    _assert_step_raises_and_changes_nothing(ours, RuntimeError, match)  # not only once
    for k, p in enumerate(ps):  # apart again: the step is torch's
        p.grad, p.data = undo[k]
        ours.state[p].update(states[k])
    _set_grads(ref, 2)
    for opt in (ours, ref):
        opt.step()
    _assert_same(ours, ref, backend)


@pytest.mark.parametrize("backend", backends_here())
def test_a_grad_in_another_params_memory_among_hundreds_raises(backend):
    """NOTE [arrays apart] at a size where the pass scans in two threads (from 256 tensors): new grads every step
    (only their addresses move), then one of them, in the second thread's range, is another param of its size (the
    lookup of its storage sees it); then a param of the first range is moved into the last param's memory (the
    sweep sees it), after a step where it was moved into memory of its own."""
    n = 300
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
    opt = FusedAdamW(params, backend=backend)
    for s in range(2):
        for k, p in enumerate(params):
            p.grad = torch.full((4,), 0.01 * (k + s))
        opt.step()
    for p in params:
        p.grad = torch.ones(4)
    params[290].grad = params[7].detach()
    _assert_step_raises_and_changes_nothing(opt, RuntimeError, r"params\[7\].* and grads\[290\].* share memory")
    params[290].grad = torch.ones(4)
    params[3].data = params[299].detach().clone()
    opt.step()
    params[3].data = params[299].detach()
    _assert_step_raises_and_changes_nothing(opt, RuntimeError, r"params\[3\].* and params\[299\].* share memory")


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("case", ["params-adjacent", "params-interleaved", "grads-shared", "grads-overlapping"])
def test_memory_shared_where_no_update_meets_another_steps_as_torch(backend, case):
    """NOTE [arrays apart]'s other side: params side by side in one buffer, params interleaved in one (columns of a
    matrix, each strided), grads that are one tensor or overlap (a step only reads them) step as torch's for-loop."""
    ours_and_ref = []
    for _ in range(2):
        base = make_params(torch.float32, [(4, 6)])[0]
        if case == "params-adjacent":
            ps = [torch.nn.Parameter(base.view(-1)[:10]), torch.nn.Parameter(base.view(-1)[10:])]
        elif case == "params-interleaved":
            ps = [torch.nn.Parameter(base[:, k]) for k in range(6)]
        else:
            ps = [torch.nn.Parameter(base[k].clone()) for k in range(4)]
        ours_and_ref.append(ps)
    ours = FusedAdamW(ours_and_ref[0], backend=backend, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(ours_and_ref[1], foreach=False, lr=0.01, weight_decay=0.1)

    def grads(opt, step):
        ps = _params(opt)
        if case.startswith("grads"):
            g = make_grads([torch.empty(8)], step)[0]
            for k, p in enumerate(ps):
                p.grad = g[:6] if case == "grads-shared" else g[k % 3: k % 3 + 6]
        else:
            _set_grads(opt, step)

    grads(ours, 0)
    shared = [p.grad if case.startswith("grads") else p for p in ours_and_ref[0]]
    assert len({t.untyped_storage().data_ptr() for t in shared}) == 1  # (the case is what it says)
    _run(ours, ref, backend, mutate=lambda opt: None, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("kind", [OrderedDict, lambda d: defaultdict(None, d)], ids=["OrderedDict", "defaultdict"])
def test_a_state_given_as_a_dict_subclass_is_watched(backend, kind):
    """A param's state put back as another kind of dict (an OrderedDict from a user's checkpoint code): an entry
    of it replaced at a later step is seen, as in a plain dict."""
    ours, ref = _pair(backend)
    for s in range(STEPS):
        for opt in (ours, ref):
            p = opt.param_groups[0]["params"][2]
            if s == 2:
                opt.state[p] = kind({k: v.clone() for k, v in opt.state[p].items()})
            if s == 3:
                opt.state[p]["exp_avg"] = torch.full_like(p, 0.3)
            _set_grads(opt, s)
            opt.step()
        _assert_same(ours, ref, backend, where=f"step {s}:")


@pytest.mark.parametrize("backend", backends_here())
def test_a_group_taken_out_and_put_back_steps_as_torch(backend):
    """A group popped from param_groups (frozen), its param's state deleted meanwhile while the other group steps
    (and rebuilds its plan), then put back: the plan the group had is stale and must not step the old states."""
    ours, ref = _pair(backend)
    for opt in (ours, ref):
        ps = opt.param_groups[0]["params"]
        opt.param_groups[0]["params"], second = ps[:3], ps[3:]
        opt.add_param_group({"params": second})
    frozen = {}
    for s in range(STEPS):
        for opt in (ours, ref):
            if s == 2:
                frozen[opt] = opt.param_groups.pop()
                del opt.state[frozen[opt]["params"][0]]
            if s == 4:
                opt.param_groups.append(frozen[opt])
            _set_grads(opt, s)
            opt.step()
        _assert_same(ours, ref, backend, where=f"step {s}:")


@pytest.mark.parametrize("backend", backends_here())
def test_params_overlapping_across_groups_step_as_torch(backend):
    """NOTE [arrays apart] is per call: two groups are stepped one after the other, as torch's for-loop steps them, so
    params of two groups may overlap, and a grad may be a param of the other group."""
    groups = []
    for _ in range(2):
        base, other = make_params(torch.float32, [(16,), (8,)])  # first: base[:12], second: base[8:] (group 1)
        groups.append([{"params": [torch.nn.Parameter(base[:12])]},
                       {"params": [torch.nn.Parameter(base[8:]), torch.nn.Parameter(other)]}])
    ours = FusedAdamW(groups[0], backend=backend, lr=0.01)
    ref = torch.optim.AdamW(groups[1], foreach=False, lr=0.01)

    def grads(opt, step):
        first, second, third = _params(opt)
        for p, g in zip((first, second, third), make_grads([first, second, third], step)):
            p.grad = g
        if step % 2:
            third.grad = first.detach()[:8]  # (apart from second, its group's other param)

    _run(ours, ref, backend, mutate=lambda opt: None, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("count", [-1.0, -5.0, float("nan")], ids=["minus-one", "minus-five", "nan"])
def test_step_count_below_zero_raises_and_changes_nothing(backend, count):
    """A step count set in place to -1 makes both bias corrections 0 (torch's for-loop: ZeroDivisionError halfway
    through the params), NaN makes the param NaN: an error naming the count, before anything is written."""
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    p = ours.param_groups[0]["params"][2]
    ours.state[p]["step"].fill_(count)

    def tensors():
        return [t for q in _params(ours) for t in (q, *ours.state[q].values())]

    before = [t.clone() for t in tensors()]
    with pytest.raises(ValueError, match=r"state_steps\[2\].* is (-1|-5|nan).*; a step count is a number >= 0"):
        ours.step()
    assert all(torch.equal(a, b) or a.isnan().all() and b.isnan().all() for a, b in zip(before, tensors()))


BAD_HYPERPARAMETERS = [("lr", "0.1", r"\['lr'\] is '0.1'"), ("lr", float("nan"), r"\['lr'\] is nan"),
                       ("lr", -1.0, r"\['lr'\] is -1.0"),
                       ("lr", torch.tensor([0.1, 0.2]), r"\['lr'\] is a Tensor of shape \(2,\)"),
                       ("betas", (0.9,), r"\['betas'\] is \(0.9,\)"),
                       ("betas", (0.9, 1.0), r"\['betas'\]\[1\] is 1.0"),
                       ("betas", (1.0, 0.999), r"\['betas'\]\[0\] is 1.0"),
                       ("betas", (-0.1, 0.999), r"\['betas'\]\[0\] is -0.1"),
                       ("betas", (None, 0.9), r"\['betas'\]\[0\] is None"),
                       ("eps", None, r"\['eps'\] is None"), ("eps", -1e-8, r"\['eps'\] is -1e-08"),
                       ("weight_decay", float("nan"), r"\['weight_decay'\] is nan"),
                       # the options beyond torch, as the constructor checks them (an int state_dtype would cast the
                       # moments to integers first)
                       ("state_dtype", torch.int32, r": Invalid state_dtype: torch.int32"),
                       ("seed", -1, r": Invalid seed: -1"), ("seed", 1.5, r": Invalid seed: 1.5"),
                       ("master_weights", "yes", r": Invalid master_weights: 'yes'"),
                       ("stochastic_rounding", 1, r": Invalid stochastic_rounding: 1")]


@pytest.mark.parametrize("backend", backends_here())
def test_hyperparameters_the_constructor_accepts_step_as_torch(backend):
    """What the step's check accepts includes what torch's constructor does: betas as one 2-element tensor,
    numpy numbers, ints."""
    import numpy as np

    ours, ref = _pair(backend, betas=torch.tensor([0.9, 0.99]))

    def mutate(opt):
        opt.param_groups[0].update(lr=np.float32(0.02), eps=0, weight_decay=np.float64(0.05))

    _run(ours, ref, backend, mutate)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("key, value, match", BAD_HYPERPARAMETERS,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameter_set_after_construction_raises_and_changes_nothing(backend, key, value, match):
    """param_groups entries change after construction (schedulers, by hand): a step checks them as the constructor
    does, for every group before stepping any, and names the group and the entry. torch's for-loop would step the
    first group and then fail in the middle of the second, or write NaNs."""
    ours, _ = _pair(backend)
    params = ours.param_groups[0]["params"]
    ours.param_groups[0]["params"] = params[:3]
    ours.add_param_group({"params": params[3:]})
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    ours.param_groups[1][key] = value
    _assert_step_raises_and_changes_nothing(ours, ValueError, r"param_groups\[1\]" + match)


def _freed(t):
    t.untyped_storage().resize_(0)
    return t


BAD_AMP = {
    "grad_scale of two elements": (dict(grad_scale=torch.tensor([2.0, 2.0])), ValueError, "grad_scale must be a one"),
    "grad_scale a float": (dict(grad_scale=2.0), TypeError, r"grad_scale must be a Tensor or None, got 2.0"),
    "grad_scale an int tensor": (dict(grad_scale=torch.tensor(2)), ValueError, r"grad_scale .* dtype torch.int64"),
    "grad_scale freed": (dict(grad_scale=_freed(torch.tensor(2.0))), ValueError, "grad_scale .* no value to read"),
    "grad_scale on meta": (dict(grad_scale=torch.tensor(2.0, device="meta")), ValueError, "grad_scale .* meta"),
    "found_inf complex": (dict(found_inf=torch.tensor(1j)), ValueError, "found_inf must be .* real .*complex64"),
    "found_inf a float": (dict(found_inf=0.0), TypeError, "found_inf must be a Tensor"),
}


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("case", BAD_AMP)
def test_bad_amp_tensors_raise_and_change_nothing(backend, case):
    """grad_scale and found_inf (GradScaler's one-element float tensors) are checked once, before anything is
    stepped, the same on every backend (a two-element scale divided element-wise on one and was read as its first
    element on another; a freed one was read out of bounds)."""
    kwargs, error, match = BAD_AMP[case]
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    tensors = lambda: [g for p in _params(ours) for g in (p, p.grad, *ours.state[p].values())]  # noqa: E731
    before = [t.clone() for t in tensors()]
    with pytest.raises(error, match=match):
        ours.step(**kwargs)
    for i, (a, b) in enumerate(zip(before, tensors())):
        assert torch.equal(a, b), f"tensor {i} changed"


@pytest.mark.parametrize("backend", backends_here())
def test_a_failed_step_leaves_every_state_entry_as_it_was(backend):
    """NOTE [state journal]: building its plans, a step makes states (a param's first grad), converts them (a float
    step count, a float64 moment of a float32 param) and moves them; a later group's error then puts every entry
    back: the same objects under the same keys, in every group. Fixed, the step runs."""
    ours, _ = _pair(backend)
    ps = _params(ours)
    ours.param_groups[0]["params"] = ps[:3]
    ours.add_param_group({"params": ps[3:]})
    for p in ps[1:]:
        p.grad = torch.ones_like(p)
    ours.step()  # ps[0] has no grad yet: no state
    for p in ps:
        p.grad = torch.ones_like(p)
    st = ours.state[ps[1]]
    st["step"], st["exp_avg"] = 1.0, st["exp_avg"].double()
    ours.state[ps[4]]["step"] = "abc"  # group 1
    entries = lambda: {id(p): dict(ours.state[p]) for p in ps if p in ours.state}  # noqa: E731
    before = entries()
    with pytest.raises(ValueError, match=r"state\['step'\] .* is 'abc'"):
        ours.step()
    after = entries()
    assert after.keys() == before.keys() and ps[0] not in ours.state
    for key, entry in before.items():
        assert after[key].keys() == entry.keys() and all(after[key][k] is v for k, v in entry.items())
    ours.state[ps[4]]["step"] = 1.0
    ours.step()
    assert float(ours.state[ps[0]]["step"]) == 1 and float(ours.state[ps[1]]["step"]) == 2
    assert ours.state[ps[1]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", backends_here())
def test_deepcopy_stepped_beside_the_original(backend):
    ours, ref = _pair(backend)
    _stepped(ours, ref)
    ours2, ref2 = copy.deepcopy(ours), copy.deepcopy(ref)
    for s in range(2, 6):
        for opt in (ours, ref, ours2, ref2):
            _set_grads(opt, s + (10 if opt in (ours2, ref2) else 0))  # the copies get other grads
            opt.step()
        _assert_same(ours, ref, backend, where=f"original, step {s}:")
        _assert_same(ours2, ref2, backend, where=f"copy, step {s}:")


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "triton"])  # the interpreter is not thread-safe
def test_two_optimizers_in_two_threads(backend):
    pairs = [_pair(backend, shapes=[(n,) for n in (3, 1000, 17, 4096)] * 50) for _ in range(2)]
    errors = []

    def train(opt, seed):
        try:
            for s in range(5):
                _set_grads(opt, s + seed)
                opt.step()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=train, args=(ours, 7 * k)) for k, (ours, _) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, (ours, ref) in enumerate(pairs):
        for s in range(5):
            _set_grads(ref, s + 7 * k)
            ref.step()
        _assert_same(ours, ref, backend, where=f"optimizer {k}:")


@pytest.mark.parametrize("backend", backends_here())
def test_a_state_write_in_one_optimizer_keeps_the_others_plan(backend):
    """NOTE [state generation]: the counter is per optimizer."""
    a, _ = _pair(backend)
    b, _ = _pair(backend)
    for opt in (a, b):
        _set_grads(opt, 0)
        opt.step()
    plan_b = b._plans[0]
    _state_replaced(a)
    _set_grads(b, 1)
    b.step()
    assert b._plans[0] is plan_b


@pytest.mark.parametrize("backend", backends_here())
def test_adam_and_amsgrad_mutations(backend):
    """The same changes under Adam (L2 weight decay) with amsgrad: the max state follows too."""
    params0 = make_params(torch.float32, SHAPES)
    ours = FusedAdam([torch.nn.Parameter(p.clone()) for p in params0], lr=0.01, weight_decay=0.1, amsgrad=True,
                     backend=backend)
    ref = torch.optim.Adam([torch.nn.Parameter(p.clone()) for p in params0], lr=0.01, weight_decay=0.1,
                           amsgrad=True, foreach=False)

    def mutate(opt):
        _replace_param(opt)
        _steps_in_place(opt)
        p = opt.param_groups[0]["params"][3]
        opt.state[p]["max_exp_avg_sq"] = opt.state[p]["max_exp_avg_sq"] * 2

    _run(ours, ref, backend, mutate)


def _later_partition_made_bad(opt, how):
    """Break the last param of the last partition (group 1, or the fp64 params of one group)."""
    p = _params(opt)[-1]
    if how == "count":
        opt.state[p]["step"].fill_(-1.0)
    elif how == "storage":
        p.untyped_storage().resize_(0)
    else:  # "shape"
        p.data = torch.randn(p.numel() + 3, dtype=p.dtype)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("layout", ["two groups", "two dtypes"])
@pytest.mark.parametrize("how", ["count", "storage", "shape"])
def test_bad_tensor_in_a_later_partition_changes_nothing_in_the_earlier_ones(backend, layout, how):
    """NOTE [all checked first]: a step of several partitions (param groups, dtypes) checks every one before it
    writes any, so an error in the last leaves the first as it was (params, states and step counts)."""
    params0 = make_params(torch.float32, SHAPES)
    ps = [torch.nn.Parameter(p.clone()) for p in params0[:3]]
    late = [torch.nn.Parameter(p.clone().double() if layout == "two dtypes" else p.clone()) for p in params0[3:]]
    groups = [{"params": ps}, {"params": late}] if layout == "two groups" else [{"params": ps + late}]
    ours = FusedAdamW(groups, backend=backend, lr=0.01, weight_decay=0.1)
    _stepped(ours)
    _set_grads(ours, 2)
    _later_partition_made_bad(ours, how)
    early = [t for q in ps for t in (q, *ours.state[q].values())]
    before = [t.clone() for t in early]
    with pytest.raises((RuntimeError, ValueError), match=r"state_steps|storage|shape"):
        ours.step()
    for i, (a, b) in enumerate(zip(before, early)):
        assert torch.equal(a, b), f"tensor {i} of the first partition changed"


@pytest.mark.parametrize("backend", backends_here())
def test_a_step_that_raises_after_the_grads_moved_steps_the_new_grads_next_time(backend):
    """An error after the grads moved (here a bad step count, found after the pass read the new grads' addresses)
    must not leave a backend with the old addresses: once the count is fixed, the next step uses the grads the
    params hold, as torch's for-loop does."""
    ours, ref = _pair(backend)
    _stepped(ours, ref)
    kept = [p.grad for p in _params(ours)]  # the old grads stay alive (a stale address would still read them)
    _set_grads(ours, 2)
    p2 = ours.param_groups[0]["params"][2]
    saved = ours.state[p2]["step"].clone()
    ours.state[p2]["step"].fill_(-1.0)
    with pytest.raises(ValueError, match=r"state_steps\[2\]"):
        ours.step()
    ours.state[p2]["step"].copy_(saved)
    ours.step()
    _set_grads(ref, 2)
    ref.step()
    _assert_same(ours, ref, backend, where="after the failed step:")
    assert all(g is not None for g in kept)


def _random_grads(rng):
    """Grads of one step: some params without one, some with another layout, set anew or written in place."""
    pattern = [(rng.random() < 0.1, rng.random() < 0.2) for _ in range(16)]
    in_place = rng.random() < 0.3

    def grads(opt, step):
        ps = _params(opt)
        for p, g, (none, strided) in zip(ps, make_grads(ps, step), pattern):
            if none:
                p.grad = None
            elif in_place and p.grad is not None and p.grad.shape == p.shape:
                p.grad.copy_(g)
            else:
                p.grad = g.t().contiguous().t() if strided and g.dim() == 2 else g

    return grads


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("seed", range(8))
def test_random_mutation_sequences_step_as_torch(backend, seed):
    """Sequences of the changes above (several between two steps, grads that come and go or change layout), some
    groups of two dtypes: after every step, params and every state as torch's for-loop has them. A change that
    fails on torch's side (a state or an index that is not there) must fail on ours alike, halfway as it may."""
    import random

    rng = random.Random(seed)
    shapes = [rng.choice([(1,), (7,), (0,), (3, 5), (4, 4), (2, 3, 4), (67,)]) for _ in range(rng.randint(5, 8))]
    ours, ref = _pair(backend, shapes=shapes, amsgrad=rng.random() < 0.3, maximize=rng.random() < 0.3)
    if rng.random() < 0.5:  # a second partition: every other param in float64, states made by the first step
        for opt in (ours, ref):
            for p in _params(opt)[::2]:
                p.data = p.data.double()
    names = sorted(MUTATIONS)
    for s in range(8):
        for name in rng.sample(names, rng.choice([0, 1, 1, 2, 3])):
            errors = []
            for opt in (ours, ref):
                try:
                    MUTATIONS[name](opt)
                    errors.append(None)
                except Exception as e:  # noqa: BLE001 (compared below)
                    errors.append(type(e))
            assert errors[0] is errors[1], (name, errors)
        grads = _random_grads(rng)
        errors = []
        for opt in (ours, ref):
            grads(opt, s)
            try:
                opt.step()
                errors.append(None)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors[1] is not None:
            return  # torch refuses this sequence (a dtype mixed into one param's states); so may we
        assert errors[0] is None, errors[0]
        _assert_same(ours, ref, backend, where=f"seed {seed} step {s}:")


# ---- what the hunts of 2026-12-07 (seventh session) found: each case failed before its fix ----------------------


@pytest.mark.parametrize("backend", backends_here())
def test_a_param_resized_in_place_of_its_address_steps_as_torch(backend):
    """`p.data = p.data[:4]` (and its states alike) moves no address: the chunk table made for the old size must
    follow anyway (triton stepped the old 8 elements, reading a 4-element grad out of bounds), and growing back."""
    buf = {}
    ours, ref = _pair(backend, shapes=[(8,), (3,)])
    for opt in (ours, ref):
        buf[opt] = _params(opt)[0].data

    def shrink(opt):
        p = _params(opt)[0]
        p.data = p.data[:4]
        for k in ("exp_avg", "exp_avg_sq"):
            opt.state[p][k].data = opt.state[p][k].data[:4]

    def grow(opt):
        p = _params(opt)[0]
        p.data = buf[opt]
        for k in ("exp_avg", "exp_avg_sq"):
            opt.state[p][k] = torch.zeros(8)

    for s in range(6):
        for opt in (ours, ref):
            if s == 2:
                shrink(opt)
            if s == 4:
                grow(opt)
            _set_grads(opt, s)
            opt.step()
        _assert_same(ours, ref, backend, where=f"step {s}:")
        torch.testing.assert_close(buf[ours], buf[ref], **(dict(atol=0, rtol=0) if backend == "reference" else {}))


@pytest.mark.parametrize("backend", backends_here())
def test_a_flattened_param_listed_in_an_earlier_group_steps_as_torch(backend):
    """A flat run's param appended to an earlier group: torch steps it twice a step (its count +2). The run's plan
    was still valid, and its one counter overwrote the count the earlier group had bumped."""
    from fused_adam import flatten_parameters

    ours, ref = _pair(backend)
    for opt in (ours, ref):
        ps = _params(opt)
        if opt is ours:
            flatten_parameters(ps[2:])
        opt.param_groups[0]["params"] = ps[:2]
        opt.add_param_group({"params": ps[2:]})

    def append(opt):
        assert opt is ref or ours._plans[1].has_flat  # (the run stepped until now)
        opt.param_groups[0]["params"].append(opt.param_groups[1]["params"][1])

    def grads_in_place(opt, step):  # (the flat run steps only while every grad is its grad buffer's view)
        for p, g in zip(_params(opt), make_grads(_params(opt), step)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    _run(ours, ref, backend, append, grads=grads_in_place)


@pytest.mark.parametrize("backend", backends_here())
def test_stochastic_rounding_ids_follow_an_earlier_groups_params(backend):
    """Stochastic rounding's bits hash each param's index over all groups: after a param is appended to an earlier
    group, a later group's params have new indices, so a run resumed from a checkpoint (which builds its plans
    anew) is bitwise the uninterrupted one only if the uninterrupted one's plans follow too."""
    def make():
        ps = [torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(i)).bfloat16()) for i in range(4)]
        opt = FusedAdamW([{"params": ps[:2]}, {"params": ps[2:3]}], lr=0.01, stochastic_rounding=True, backend=backend)
        return ps, opt

    def grads(ps, s):
        for i, p in enumerate(ps):
            p.grad = torch.randn(64, generator=torch.Generator().manual_seed(100 * s + i)).bfloat16()

    ps, opt = make()
    for s in range(2):
        grads(ps[:3], s)
        opt.step()
    opt.param_groups[0]["params"].append(ps[3])
    grads(ps, 2)
    opt.step()
    resumed_ps, resumed = make()
    for a, b in zip(resumed_ps, ps):
        a.data.copy_(b.data)
    resumed.param_groups[0]["params"].append(resumed_ps[3])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for s in (3, 4):
        for x, q in ((opt, ps), (resumed, resumed_ps)):
            grads(q, s)
            x.step()
        for i, (a, b) in enumerate(zip(ps, resumed_ps)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"step {s}: param {i}"


@pytest.mark.parametrize("backend", backends_here())
def test_a_param_without_a_grad_whose_dtype_changed_is_skipped_as_torch(backend):
    """`a.data = a.data.double()` with its states left float32 and `a.grad = None`: torch skips a and steps the
    others. The cpu backend's native step refused the dtype pair (a TypeError) before its pass saw the missing grad."""
    def mutate(opt):
        p = _params(opt)[0]
        p.data = p.data.double()

    def grads(opt, step):
        _set_grads(opt, step)
        if step >= MUTATE_AT:
            _params(opt)[0].grad = None

    _run(*_pair(backend), backend, mutate, grads=grads)


@pytest.mark.parametrize("backend", backends_here())
def test_a_grad_scale_of_shape_1_with_a_0_dim_param_steps(backend):
    """A loss scale of shape (1,) (Megatron's and DeepSpeed's scalers keep one) with a 0-dim param (CLIP's
    logit_scale): the reference backend divided the 0-dim grad by it in place, which broadcasts to (1,), and failed
    after stepping the params before it; the retry then stepped them again."""
    results = []
    for shape in ((), (1,)):
        ps = [torch.nn.Parameter(torch.linspace(-1, 1, 12).view(4, 3)), torch.nn.Parameter(torch.tensor(2.0))]
        opt = FusedAdamW(ps, lr=0.1, backend=backend)
        for s in range(3):
            ps[0].grad, ps[1].grad = torch.full((4, 3), 1024.0 * (s + 1)), torch.tensor(512.0)
            opt.step(grad_scale=torch.full(shape, 1024.0))
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["step"].clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert float(results[1][-1]) == 3


@pytest.mark.parametrize("backend", [*backends_here(), "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_an_integer_param_raises_and_changes_nothing(backend, dtype):
    """An integer or bool param with a grad (torch's lerp_ fails on it, after stepping the float params before it):
    an error that names it, before any param is stepped."""
    ours, _ = _pair(backend)
    q = torch.ones(3, dtype=dtype)
    ours.add_param_group({"params": [q]})
    _set_grads(ours, 0)
    q.grad = torch.ones(3, dtype=dtype)
    with pytest.raises((RuntimeError, TypeError), match=rf"{str(dtype).split('.')[1]}|not supported|floating"):
        tensors = [t.clone() for t in _params(ours)]
        ours.step()
    for a, b in zip(tensors, _params(ours)):
        assert torch.equal(a, b)
    assert not any(ours.state.get(p) for p in _params(ours))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("how", ["freed", "sparse"])
def test_a_bad_grad_under_max_grad_norm_raises_and_changes_nothing(backend, how):
    """max_grad_norm's norm pass reads every grad before the step's per-tensor checks: a freed grad was read out of
    bounds (a segfault), a sparse one failed inside torch's norm, naming no param."""
    ps = [torch.nn.Parameter(p) for p in make_params(torch.float32, SHAPES)]
    ours = FusedAdamW(ps, lr=0.01, max_grad_norm=1.0, backend=backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    p = _params(ours)[2]
    if how == "freed":
        p.grad.untyped_storage().resize_(0)
        match = r"grad of param 2 in group 0 needs \d+ bytes of storage"
    else:
        p.grad = p.grad.to_sparse()
        match = r"sparse gradients \(grad of param 2 in group 0 is sparse\)"
    _assert_step_raises_and_changes_nothing(ours, RuntimeError, match)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("what", ["lr", "beta1"])
@pytest.mark.parametrize("how", ["freed", "meta"])
def test_a_tensor_hyperparameter_without_a_value_raises_and_changes_nothing(backend, what, how):
    """A Tensor lr or beta whose storage was freed (read out of bounds: a segfault on the reference backend) or on
    the meta device (no value: the reference backend wrote part of the step): an error naming it, nothing written."""
    ours, _ = _pair(backend, lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    bad = torch.tensor(0.5, device="meta") if how == "meta" else _freed(torch.tensor(0.5))
    group = ours.param_groups[0]
    if what == "lr":
        group["lr"] = bad
    else:
        group["betas"] = (bad, group["betas"][1])
    name = r"\['lr'\]" if what == "lr" else r"\['betas'\]\[0\]"
    _assert_step_raises_and_changes_nothing(ours, ValueError, rf"{name} is a Tensor .* with no value to read")
    with pytest.raises(ValueError, match="has no value to read"):
        FusedAdamW(_params(ours), **({"lr": bad} if what == "lr" else {"betas": (bad, torch.tensor(0.999))}),
                   backend=backend)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("flat", [False, True], ids=["", "flattened"])
@pytest.mark.parametrize("case", ["exp_avg_sq deleted", "step deleted", "exp_avg int32", "exp_avg complex"])
def test_a_state_missing_an_entry_or_of_another_kind_raises_and_changes_nothing(backend, case, flat):
    """torch's step raises KeyError on a state without step, exp_avg or exp_avg_sq, and a dtype error on an integer
    moment or a complex one of a real param; we made zeros (an update of 1.34 where Adam's is ~1e-3 after 200 steps)
    or cast (dropping the imaginary part) and stepped. Flattened, the flat run copied the integers into its view."""
    ours, _ = _pair(backend)
    if flat:
        from fused_adam import flatten_parameters

        flatten_parameters(_params(ours))
    _stepped(ours)
    st = ours.state[_params(ours)[1]]
    key = case.split()[0]
    if case.endswith("deleted"):
        del st[key]
        error, match = KeyError, rf"no {key} .*\(param 1 of group 0\)"
    else:
        st[key] = st[key].to(torch.int32 if case.endswith("int32") else torch.complex64)
        error, match = TypeError, rf"state\['exp_avg'\] .* has dtype torch\.(int32|complex64).*\(param 1 of group 0\)"
    _set_grads(ours, 2)
    _assert_step_raises_and_changes_nothing(ours, error, match)


@pytest.mark.parametrize("backend", backends_here())
def test_found_inf_nonzero_in_float64_skips_the_step(backend):
    """found_inf is read as nonzero or not: 1e-300 in float64 is 0 once converted to float32 (the cpu backend
    stepped)."""
    ours, _ = _pair(backend)
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    tensors = lambda: _params(ours) + [v for p in _params(ours) for v in ours.state[p].values()]  # noqa: E731
    before = [t.clone() for t in tensors()]
    ours.step(found_inf=torch.tensor(1e-300, dtype=torch.float64))
    for i, (a, b) in enumerate(zip(before, tensors())):
        assert torch.equal(a, b), f"tensor {i} changed"


def test_load_state_dict_refuses_one_id_for_two_params():
    """One saved id listed for two different params: one of them would lose its state (torch fails later, at the
    step, with a shape error)."""
    ours, _ = _pair("reference")
    _set_grads(ours, 0)
    ours.step()
    sd = copy.deepcopy(ours.state_dict())
    sd["param_groups"][0]["params"][2] = sd["param_groups"][0]["params"][1]
    with pytest.raises(ValueError, match=r"id 1 for two different params: param group 0, param 1 and param group 0, "
                                         r"param 2"):
        ours.load_state_dict(sd)


@pytest.mark.parametrize("kwargs, match", [(dict(seed=True), r"Invalid seed: True"),
                                           (dict(max_grad_norm=True), r"Invalid max_grad_norm value: True")])
def test_bools_are_not_numbers_for_the_options_beyond_torch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_max_grad_norm_takes_a_numpy_number():
    np = pytest.importorskip("numpy")
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamW([p], max_grad_norm=np.float32(0.5))
    p.grad = torch.full((3,), 2.0)
    opt.step()
    assert isinstance(opt.max_grad_norm, float)
    torch.testing.assert_close(opt.grad_norm, torch.tensor(12.0).sqrt())


def test_seed_takes_a_numpy_integer():
    np = pytest.importorskip("numpy")
    ps = [torch.nn.Parameter(torch.randn(9, generator=torch.Generator().manual_seed(0)).bfloat16()) for _ in range(2)]
    opts = [FusedAdamW([p], stochastic_rounding=True, seed=seed) for p, seed in zip(ps, (np.int64(7), 7))]
    assert type(opts[0].param_groups[0]["seed"]) is int
    for p, opt in zip(ps, opts):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(ps[0], ps[1])


@pytest.mark.parametrize("kind", [set, iter])
def test_a_params_entry_that_is_no_list_raises_naming_it(kind):
    ours, _ = _pair("reference")
    _set_grads(ours, 0)
    ours.param_groups[0]["params"] = kind(ours.param_groups[0]["params"])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] is a \w+; expected a list of tensors"):
        ours.step()


@pytest.mark.parametrize("backend", backends_here())
def test_an_error_names_the_param_by_its_group_position(backend):
    """A group of two dtypes steps as two partitions, each counting its entries from 0: an error names the param by
    its position in the group too (the native backends' messages named `exp_avgs[1]`, the partition's)."""
    ours, _ = _pair(backend, shapes=[(4,), (3,), (5,), (2,)])
    _params(ours)[1].data = _params(ours)[1].data.double()
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    ours.state[_params(ours)[2]]["exp_avg"] = torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"param 2 of group 0"):
        ours.step()


@pytest.mark.parametrize("backend", backends_here())
def test_an_error_naming_two_entries_names_both_params(backend):
    """A grad set to another param's memory names two entries; each gets its group position (the second one was
    left as the partition's position, which a param without a grad shifts)."""
    ours, _ = _pair(backend, shapes=[(4,), (3,), (3,), (3,)])
    _set_grads(ours, 0)
    ours.step()
    ps = _params(ours)
    _set_grads(ours, 1)
    ps[0].grad = None  # the partition: params 1, 2, 3 of the group at positions 0, 1, 2
    ps[3].grad = ps[2].detach()
    with pytest.raises(RuntimeError, match=r"param 2\b.*param 3\b|param 3\b.*param 2\b") as info:
        ours.step()
    assert backend == "reference" or "is param 2" in str(info.value) and "is param 3" in str(info.value), info.value


def _weight_decay_on(opt):
    opt.param_groups[0]["weight_decay"] = 0.1


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("cls", ["adamw", "adam"])
def test_weight_decay_switched_on_after_steps_is_applied(backend, cls):
    """A group built without weight decay (the plan's options: none), then given one (a scheduler, or by hand): the
    next step decays, as torch's for-loop does. Kills: the plan key without `weight_decay != 0` (optimizer.py
    _plan_key), where the stale PartOptions.wd_mode NONE steps on without decay, silently."""
    if cls == "adamw":
        ours, ref = _pair(backend, weight_decay=0.0)
    else:
        params0 = make_params(torch.float32, [(7,), (3, 5), (4,)])
        ours = FusedAdam([torch.nn.Parameter(p.clone()) for p in params0], lr=0.01, backend=backend)
        ref = torch.optim.Adam([torch.nn.Parameter(p.clone()) for p in params0], lr=0.01, foreach=False)
    _run(ours, ref, backend, _weight_decay_on)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("victim", ["grad", "exp_avg", "exp_avg_sq"])
def test_a_grad_or_state_of_another_dtype_raises_and_changes_nothing(backend, victim):
    """A grad (`p.grad.data = ...double()`; torch's for-loop raises on it in lerp_) or a state whose `.data` became
    another dtype: an error naming the entry, before anything is written (step counts included). Kills: plan.py
    check_tensors without its dtype check (the reference backend then raises PartialStep for the grad, having
    stepped the params before it and every step count, and steps a float64 state on silently)."""
    ours, _ = _pair(backend)
    _stepped(ours)
    _set_grads(ours, 2)
    p = ours.param_groups[0]["params"][3]
    t = p.grad if victim == "grad" else ours.state[p][victim]
    t.data = t.data.double()
    _assert_step_raises_and_changes_nothing(ours, (RuntimeError, TypeError), r"dtype|Double")
    assert all(ours.state[q]["step"].item() == 2 for q in _params(ours))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("key", ["lr", "beta1", "beta2"])
def test_a_complex_tensor_hyperparameter_set_after_construction_raises_and_changes_nothing(backend, key):
    """A one-element complex Tensor lr or beta (a scheduler writing into a tensor of the wrong dtype) is no
    hyperparameter: ValueError naming the entry, before anything is written. Kills: args._in_range without
    `not value.is_complex()` (the step then fails after writing, or steps with a complex lr)."""
    ours, _ = _pair(backend, lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    _set_grads(ours, 0)
    ours.step()
    _set_grads(ours, 1)
    g = ours.param_groups[0]
    if key == "lr":
        g["lr"] = torch.tensor(0.01 + 0j)
        match = r"\['lr'\] is a Tensor of shape \(\) and dtype torch.complex64"
    else:
        i = int(key[-1]) - 1
        betas = list(g["betas"])
        betas[i] = torch.tensor(0.9 + 0j)
        g["betas"] = tuple(betas)
        match = rf"\['betas'\]\[{i}\] is a Tensor of shape \(\) and dtype torch.complex64"
    _assert_step_raises_and_changes_nothing(ours, ValueError, r"param_groups\[0\]" + match)


class _HalvedGrad(torch.nn.Parameter):
    """A Parameter subclass with a .grad property of its own (as wrapper subclasses may define): torch's for-loop
    reads p.grad through it."""

    @property
    def grad(self):
        g = torch.Tensor.grad.__get__(self)
        return None if g is None else g * 0.5

    @grad.setter
    def grad(self, value):
        torch.Tensor.grad.__set__(self, value)


@pytest.mark.parametrize("backend", backends_here())
def test_a_param_subclass_with_its_own_grad_property_steps_as_torch(backend):
    """A backend that reads .grad natively (grads=None, plan.Partition.reads_grads) must not be offered a group
    holding a subclass whose .grad is a Python property: the step uses what p.grad returns, as torch's. Kills:
    plan.build's reads_grads without `all(type(p) in _PLAIN ...)` (the cpu kernel then reads the raw grad)."""
    params0 = make_params(torch.float32, [(5,), (2, 3)])
    ours_p = [_HalvedGrad(p.clone()) for p in params0]
    ref_p = [_HalvedGrad(p.clone()) for p in params0]
    ours = FusedAdam(ours_p, lr=0.01, backend=backend)
    ref = torch.optim.Adam(ref_p, lr=0.01, foreach=False)
    tol = dict(atol=0, rtol=0) if backend == "reference" else {}
    for s in range(3):
        for opt, ps in ((ours, ours_p), (ref, ref_p)):
            for p, g in zip(ps, make_grads(params0, s)):
                p.grad = g
            opt.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a.detach(), b.detach(), **tol)
            torch.testing.assert_close(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"], **tol)
