"""Flat param and grad buffers (fused_adam.flat, NOTE [flat buffers]).

flatten_parameters keeps the model what it was (same Parameter objects, values, outputs, state_dict) while autograd
writes into the grad buffer; a partition stepped as one range (find_run / FlatRun, through a backend's own
prepare/step) steps exactly as the same backend steps the params one by one, and whatever breaks flatness (a
param's .data replaced, a grad replaced or None, a step count or a state changed) makes the step fall back to the
per-tensor path on that step, never a wrong step.

FlatDriver below is the wiring the step plan does with a run (see flat.py and the report), written out so that the
idea is tested end to end through the backend interface before the optimizer calls it.
"""
from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from parity import backends_here, bits, make_grads, make_params

from fused_adam import FusedAdamW, backends
from fused_adam.backends import Amp, Hyper, PartOptions
from fused_adam.flat import ATTR, FlatRun, _Tag, find_run, flatten_parameters
from fused_adam.plan import Partition
from fused_adam.state import Generation, StateDict, param_state

BACKENDS = backends_here()
LR, WD = 1e-2, 0.1


class Scaled(torch.nn.Linear):
    """A Linear with a 0-element param too (a slot of no elements between two others)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.empty = torch.nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return super().forward(x) + self.empty.sum()


def make_model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)  # odd sizes: 7x13 weights, 13-element biases, ... none a multiple of a 64-byte slot
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), Scaled(13, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def batch(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(11, 7, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64).to(dtype)


def backward(model: torch.nn.Module, step: int) -> None:
    dtype = next(model.parameters()).dtype
    model(batch(step, dtype)).square().sum().backward()


def group(**kw) -> dict:
    g = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, amsgrad=False, maximize=False, capturable=False,
             differentiable=False, decoupled_weight_decay=True)
    g.update(kw)
    return g


class FlatDriver:
    """One param group, one partition of all its params, stepped by `backend` as the step plan would with a flat
    run: build once (find_run, states, bind, partition, prepare both), then per step valid() ? flat : per tensor."""

    def __init__(self, params: list[torch.Tensor], backend: str, **kw) -> None:
        self.group = group(**kw)
        self.params = params
        self.state = StateDict(Generation())
        p0 = params[0]
        opts = PartOptions.of(self.group, p0.dtype, False)
        self.run = find_run(params, opts)
        views = self.run.states(self.state) if self.run is not None else None
        sts = [param_state(self.state, p, opts, views[i] if views else None) for i, p in enumerate(params)]
        if self.run is not None and not self.run.bind(sts):
            self.run = None
        self.part = Partition(
            0, p0.device, p0.dtype, opts, None, params=list(params), exp_avgs=[s["exp_avg"] for s in sts],
            exp_avg_sqs=[s["exp_avg_sq"] for s in sts],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in sts] if opts.amsgrad else [],
            state_steps=[s["step"] for s in sts], master_params=[s["master_param"] for s in sts] if opts.master else [],
            tensor_ids=list(range(len(params))), view_pos=[])
        self.backend = backends.get(backend)
        assert self.backend.supports(self.part) is None
        self.backend.prepare(self.part)
        self.flat_part = self.run.partition(self.part) if self.run is not None else None
        if self.flat_part is not None:
            self.backend.prepare(self.flat_part)
        beta1, beta2 = self.group["betas"]
        self.hp = Hyper(self.group["lr"], beta1, beta2, self.group["eps"], self.group["weight_decay"])
        self.flat_steps = 0

    @torch.no_grad()
    def step(self, amp: Amp = Amp()) -> bool:
        """One step; True if it went flat."""
        if self.run is not None and self.run.valid():
            self.backend.step(self.flat_part, [self.run.grad], self.hp, amp)
            self.run.stepped()
            self.flat_steps += 1
            return True
        self.backend.step(self.part, [p.grad for p in self.params], self.hp, amp)
        return False


def assert_same(a_params, b_params, a_state, b_state, exact: bool = True, msg: str = "") -> None:
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        pairs = [("param", a.detach(), b.detach())]
        pairs += [(k, a_state[a][k], b_state[b][k]) for k in b_state.get(b, ()) if k != "step"]
        for name, x, y in pairs:
            if exact:
                assert torch.equal(bits(x), bits(y)), f"{msg}{name} of param {i} differs bitwise"
            else:
                torch.testing.assert_close(x, y, msg=lambda m: f"{msg}{name} of param {i}: {m}")
        if not b_state.get(b):  # a param torch never stepped has no state with us either
            assert not a_state.get(a), f"{msg}param {i} has a state, torch's none"
        else:
            assert float(a_state[a]["step"]) == float(b_state[b]["step"]), f"{msg}step of param {i}"


# ---- flatten_parameters ---------------------------------------------------------------------------------------


def test_flatten_keeps_the_model():
    model, ref = make_model(), make_model()
    ids = [id(p) for p in model.parameters()]
    x = batch(0)
    (flat,) = flatten_parameters(model)
    assert [id(p) for p in model.parameters()] == ids and flat.params == list(model.parameters())
    assert torch.equal(model(x), ref(x))
    assert list(model.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    covered = torch.zeros(flat.param_buffer.numel(), dtype=torch.bool)
    for i, p in enumerate(model.parameters()):
        assert p.data_ptr() % 64 == 0 and p.is_contiguous() and flat.params_in_place(i)
        assert getattr(p, ATTR).flat is flat and getattr(p, ATTR).index == i
        covered[flat.offsets[i]: flat.offsets[i] + p.numel()] = True
        assert p.grad is None  # none before, none after: a zero grad would be stepped where torch skips the param
    assert not flat.param_buffer[~covered].any() and not flat.grad_buffer.any()  # padding zero
    # The first backward's grads are moved into their slots (NOTE [grad adoption]), the next ones accumulate there.
    for _ in range(2):
        backward(model, 0)
        backward(ref, 0)
        assert flat.grads_in_place()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert not flat.grad_buffer[~covered].any()
    model.zero_grad(set_to_none=False)
    assert flat.param_buffer.numel() == sum(-(-p.numel() // 16) * 16 for p in model.parameters())
    # Loading a state_dict writes into the slots.
    model.load_state_dict(make_model(seed=1).state_dict())
    assert flat.params_in_place()
    assert torch.equal(model(x), make_model(seed=1)(x))


def test_flatten_options_and_grouping():
    model = make_model()
    model[2].weight.requires_grad_(False)  # frozen params are left where they are
    model[0].weight.grad = torch.ones_like(model[0].weight)  # an existing grad is kept, in the grad buffer
    decay = [model[0].weight, model[4].weight]
    no_decay = [model[0].bias, model[2].bias, model[4].bias]
    (flat,) = flatten_parameters([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], align=256)
    assert flat.params == decay + no_decay  # in the order given: each group one run of slots
    assert all(p.data_ptr() % 256 == 0 for p in flat.params)
    assert not hasattr(model[2].weight, ATTR) and model[2].weight.grad is None
    assert torch.equal(model[0].weight.grad, torch.ones(13, 7)) and flat.grads_in_place(0)
    opts = PartOptions.of(group(), torch.float32, False)
    assert find_run(decay, opts).lo == 0 and find_run(no_decay, opts).first == 2
    assert find_run([model[0].weight, model[0].bias], opts) is None  # not consecutive slots
    assert find_run(no_decay[::-1], opts) is None  # not in buffer order
    sr = group(stochastic_rounding=True, state_dtype=torch.bfloat16)  # bits drawn per tensor and element index
    assert find_run(decay, PartOptions.of(sr, torch.float32, False)) is None
    mixed = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
             torch.nn.Parameter(torch.randn(2))]
    buffers = flatten_parameters(mixed)
    assert [(b.dtype, len(b)) for b in buffers] == [(torch.float32, 2), (torch.float64, 1)]


def test_flatten_errors():
    with pytest.raises(ValueError, match="align must be a positive power of two"):
        flatten_parameters(make_model(), align=48)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        flatten_parameters(torch.nn.Parameter(torch.randn(3)))
    base = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="param 1 .* is not a leaf"):
        flatten_parameters([torch.nn.Parameter(torch.randn(2)), base * 2])
    a = torch.randn(10, requires_grad=True)
    tied = [torch.nn.Parameter(a.data), torch.nn.Parameter(a.data[2:5])]
    with pytest.raises(ValueError, match="params 0 and 1 share memory"):
        flatten_parameters(tied)
    assert tied[0].data_ptr() == a.data_ptr()  # nothing moved
    class Sub(torch.Tensor):
        pass

    with pytest.raises(TypeError, match="param 0 is a Sub"):
        flatten_parameters([torch.randn(2).as_subclass(Sub).requires_grad_()])
    # What stays where it is may not share memory with what moves: a frozen param or a buffer that is a view of a
    # trainable param would stop following it.
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.randn(8))
    m.head = torch.nn.Parameter(m.w.data[:3], requires_grad=False)
    with pytest.raises(ValueError, match="param 0 and param 'head' .*does not require grad.* share memory"):
        flatten_parameters(m)
    del m.head
    m.register_buffer("mask", m.w.data[5:])
    with pytest.raises(ValueError, match="param 0 and buffer 'mask' share memory"):
        flatten_parameters(m)
    frozen = torch.nn.Parameter(tied[0].data[1:3], requires_grad=False)
    with pytest.raises(ValueError, match="param 0 and item 1 .* share memory"):
        flatten_parameters([tied[0], frozen])
    assert m.w.data_ptr() == m.mask.data_ptr() - 20 and tied[0].data_ptr() == a.data_ptr()  # nothing moved


def test_backward_accumulates_into_the_grad_buffer():
    """Across backward / step / zero_grad cycles, p.grad stays the view (AccumulateGrad adds in place) and holds
    what the unflattened model's grad holds; set_to_none=True breaks it, FlatBuffer.zero_grad() mends it."""
    model, ref = make_model(), make_model()
    (flat,) = flatten_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, foreach=False)
    for step in range(4):
        for _ in range(2):  # two backwards accumulate
            backward(model, step)
            backward(ref, step)
        assert flat.grads_in_place()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad()
        assert not flat.grad_buffer.any()
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())
    backward(model, 9)
    assert not any(flat.grads_in_place(i) for i in range(len(flat)) if flat.numels[i])  # fresh grads
    flat.zero_grad()
    assert flat.grads_in_place() and not flat.grad_buffer.any()
    backward(model, 9)
    assert flat.grads_in_place() and flat.grad_buffer.any()


# ---- the optimizer side: a run stepped as one range ---------------------------------------------------------------


OPTIONS = [dict(), dict(amsgrad=True, maximize=True), dict(weight_decay=0.0, lr=torch.tensor(0.02)),
           dict(decoupled_weight_decay=False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=["default", "amsgrad-maximize", "tensor-lr", "adam-l2"])
def test_flat_run_steps_as_per_tensor(backend, kw):
    """Bitwise what the same backend does on the unflattened model, and torch's for-loop's result."""
    model, ref, oracle = make_model(), make_model(), make_model()
    flats = flatten_parameters(model)
    driver = FlatDriver(list(model.parameters()), backend, **kw)
    assert driver.run is not None
    fused_kw = {k: v for k, v in kw.items() if k != "decoupled_weight_decay"}
    adam = FusedAdamW if kw.get("decoupled_weight_decay", True) else __import__("fused_adam").FusedAdam
    torch_cls = torch.optim.AdamW if kw.get("decoupled_weight_decay", True) else torch.optim.Adam
    ref_opt = adam(ref.parameters(), lr=fused_kw.pop("lr", LR), weight_decay=fused_kw.pop("weight_decay", WD),
                   backend=backend, **fused_kw)
    oracle_opt = torch_cls(oracle.parameters(), **{k: v for k, v in group(**kw).items()
                                                   if k not in ("decoupled_weight_decay",)}, foreach=False)
    for step in range(6):
        for m in (model, ref, oracle):
            backward(m, step)
        assert driver.step()
        ref_opt.step()
        oracle_opt.step()
        flats[0].zero_grad()
        ref_opt.zero_grad()
        oracle_opt.zero_grad()
    params = list(model.parameters())
    assert_same(params, list(ref.parameters()), driver.state, ref_opt.state, msg=f"{backend} flat vs per-tensor: ")
    assert_same(params, list(oracle.parameters()), driver.state, oracle_opt.state, exact=backend == "reference",
                msg="flat vs torch: ")
    # The states are views of the run's flat buffers, and their padding stayed zero.
    run = driver.run
    for i, p in enumerate(params):
        st = driver.state[p]
        off = run.flat.offsets[i]
        assert st["exp_avg"].data_ptr() == (run.buffers["exp_avg"].data_ptr() + 4 * off if p.numel() else 0)
        assert st["step"].data_ptr() == run.steps.data_ptr() + 4 * i
    covered = torch.zeros(run.hi - run.lo, dtype=torch.bool)
    for i, p in enumerate(params):
        covered[run.flat.offsets[i]: run.flat.offsets[i] + p.numel()] = True
    for name, buf in [("param", run.param), *run.buffers.items()]:
        assert not buf[~covered].any(), f"padding of {name} written"


def _mutations():
    """(name, what to do to a model and its optimizer state after backward, whether that step is flat, whether
    the next ones are: with FlatBuffer.zero_grad() after each step, a grad breaks one step; equal step counts are
    still one counter). Each is done alike to every side of the comparison."""
    def data_replaced(model, state):
        p = model[2].weight
        p.data = p.data.clone()

    def grad_replaced(model, state):
        p = model[2].weight
        p.grad = p.grad.clone()

    def grad_fresh(model, state):  # zero_grad(set_to_none=True) then backward: fresh grads
        for p in model.parameters():
            p.grad = None
        backward(model, 50)

    def one_step_changed(model, state):
        state[model[0].bias]["step"].fill_(7.0)

    def every_step_changed(model, state):
        for p in model.parameters():
            state[p]["step"].fill_(7.0)

    def state_data_replaced(model, state):
        st = state[model[4].weight]
        st["exp_avg"].data = st["exp_avg"].clone()

    def step_data_replaced(model, state):
        st = state[model[4].bias]
        st["step"].data = st["step"].clone()

    return [
        ("data_replaced", data_replaced, False, False),
        ("grad_replaced", grad_replaced, False, True),
        ("grad_fresh", grad_fresh, False, True),
        ("one_step_changed", one_step_changed, False, False),
        ("every_step_changed", every_step_changed, True, True),
        ("state_data_replaced", state_data_replaced, False, False),
        ("step_data_replaced", step_data_replaced, False, False),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_broken_flatness_steps_as_torch(backend, mutation):
    """At step 2 something changes what flatness rests on: that step runs per tensor (unless every count was set
    alike); from the next one it is flat again where the break mends (zero_grad put the views back), per tensor
    where it does not. Every step is exactly what the same backend does on the unflattened model (through the same interface), and
    torch's for-loop's result."""
    name, mutate, at_break, mends = mutation
    model, ref, oracle = make_model(), make_model(), make_model()
    (flat,) = flatten_parameters(model)
    driver = FlatDriver(list(model.parameters()), backend, amsgrad=True)
    per_tensor = FlatDriver(list(ref.parameters()), backend, amsgrad=True)  # not flattened: no run
    assert per_tensor.run is None
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=WD, amsgrad=True, foreach=False)
    went_flat = []
    for step in range(5):
        for m in (model, ref, oracle):
            backward(m, step)
        if step == 2:
            mutate(model, driver.state)
            mutate(ref, per_tensor.state)
            mutate(oracle, oracle_opt.state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            went_flat.append(driver.step())
        # A grad that is not its view is said once (a loop with zero_grad(set_to_none=True) would not know).
        assert [str(w.message) for w in caught if "set_to_none=False" in str(w.message)] == (
            [] if step != 2 or not name.startswith("grad") else [mock.ANY])
        per_tensor.step()
        oracle_opt.step()
        flat.zero_grad()
        for m in (ref, oracle):
            m.zero_grad()
    assert went_flat == [True, True, at_break, mends, mends], name
    params = list(model.parameters())
    assert_same(params, list(ref.parameters()), driver.state, per_tensor.state, msg=f"{name}, flat vs per-tensor: ")
    assert_same(params, list(oracle.parameters()), driver.state, oracle_opt.state, exact=backend == "reference",
                msg=f"{name}, flat vs torch: ")


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_the_check_sees_a_change_anywhere_among_thousands(native):
    """NOTE [flat slot check] over 3,000 params (both threads' ranges in C++): a param's `.data`, a state's `.data`
    (a copy, or its own memory as another dtype), a step's `.data` replaced, or a grad replaced or set to None, at
    the first, a middle or the last param, makes FlatRun.valid() False (with a warning the first time, one for a
    grad, one for a param or state); the view put back, True again. The Python check (built without the
    extension) the same."""
    params = [torch.randn(3).requires_grad_() for _ in range(3000)]
    for p in params:
        p.grad = torch.zeros_like(p)
    (flat,) = flatten_parameters(params)
    driver = FlatDriver(params, "reference", amsgrad=True)
    run = driver.run
    if not native:
        run._native = None
    elif run._native is None:
        pytest.skip("the extension is not built")
    flat.zero_grad()
    assert run.valid()
    warned = set()  # each kind of break is said once
    for where in (0, 1501, 2999):
        p = params[where]
        st = driver.state[p]
        for what in ("param", "exp_avg", "max_exp_avg_sq", "step", "exp_avg as int32", "grad", "grad None"):
            if what == "param":
                view, p.data = p.data, p.data.clone()
            elif what.startswith("grad"):
                view = p.grad
                p.grad = None if what == "grad None" else p.grad.clone()
            elif what.endswith("int32"):  # its own memory, read as another dtype
                what = "exp_avg"
                view, st[what].data = st[what].data, st[what].data.view(torch.int32)
            else:
                view, st[what].data = st[what].data, st[what].data.clone()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert not run.valid(), (where, what)
            kind = "set_to_none=False" if what.startswith("grad") else "no longer a view of its slot"
            assert [kind in str(w.message) for w in caught] == ([] if kind in warned else [True]), (where, what)
            warned.add(kind)
            if what == "param":
                p.data = view
            elif what.startswith("grad"):
                p.grad = view
            else:
                st[what].data = view
            assert run.valid(), (where, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_and_grad_scale(backend):
    """AMP's found_inf skips the whole range (the count too); grad_scale unscales the grad buffer in place."""
    model, ref = make_model(), make_model()
    flatten_parameters(model)
    driver = FlatDriver(list(model.parameters()), backend)
    ref_opt = FusedAdamW(ref.parameters(), lr=LR, weight_decay=WD, backend=backend)
    for step, inf in enumerate([0.0, 1.0, 0.0]):
        for m in (model, ref):
            backward(m, step)
        amp = Amp(torch.tensor(4.0), torch.tensor(inf))
        assert driver.step(amp)
        ref_opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(inf))
        driver.run.flat.zero_grad()
        ref_opt.zero_grad()
    assert_same(list(model.parameters()), list(ref.parameters()), driver.state, ref_opt.state)
    assert float(driver.state[next(model.parameters())]["step"]) == 2


def test_states_adopted_or_declined():
    """States made before (a torch checkpoint loaded) move into the flat buffers when their counts are equal; with
    unequal counts there is no run and nothing changes."""
    model = make_model()
    params = list(model.parameters())
    torch_opt = torch.optim.AdamW(params, lr=LR, foreach=False)
    for step in range(2):
        backward(model, step)
        torch_opt.step()
    flatten_parameters(model)
    opts = PartOptions.of(group(), torch.float32, False)
    state = StateDict(Generation(), {p: dict(torch_opt.state[p]) for p in params})
    before = {id(p): {k: v.clone() for k, v in state[p].items()} for p in params}
    state[params[3]]["step"] = torch.tensor(5.0)
    kept = {id(p): dict(state[p]) for p in params}
    assert find_run(params, opts).states(state) is None
    assert all(state[p][k] is kept[id(p)][k] for p in params for k in kept[id(p)])
    state[params[3]]["step"] = torch.tensor(2.0)
    run = find_run(params, opts)
    views = run.states(state)
    sts = [param_state(state, p, opts, views[i]) for i, p in enumerate(params)]
    assert run.bind(sts)
    for i, p in enumerate(params):
        for k, v in before[id(p)].items():
            assert torch.equal(state[p][k], v), k
        expected = run.buffers["exp_avg"].data_ptr() + 4 * run.flat.offsets[i] if p.numel() else 0
        assert state[p]["exp_avg"].data_ptr() == expected


# ---- through the optimizer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_adamw_trains_a_flattened_model(backend):
    """FusedAdamW on a flattened model against torch.optim.AdamW(foreach=False) on an unflattened one: params and
    every state tensor; the state_dict loads into torch and back, and both continue alike."""
    model, oracle = make_model(), make_model()
    (flat,) = flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, amsgrad=True, backend=backend)
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=WD, amsgrad=True, foreach=False)

    def train(steps):
        for step in steps:
            for m in (model, oracle):
                backward(m, step)
            opt.step()
            oracle_opt.step()
            opt.zero_grad(set_to_none=False)
            oracle_opt.zero_grad()
            assert flat.grads_in_place()

    train(range(5))
    exact = backend == "reference"
    params, oracle_params = list(model.parameters()), list(oracle.parameters())
    assert_same(params, oracle_params, opt.state, oracle_opt.state, exact=exact)
    sd = copy.deepcopy(opt.state_dict())
    torch_opt = torch.optim.AdamW(make_model().parameters(), lr=LR, weight_decay=WD, amsgrad=True, foreach=False)
    torch_opt.load_state_dict(sd)
    for i, p in enumerate(torch_opt.param_groups[0]["params"]):
        for k, v in torch_opt.state[p].items():
            assert torch.equal(v, opt.state[params[i]][k]), k
    opt.load_state_dict(copy.deepcopy(oracle_opt.state_dict()))  # torch's states into the flattened model's optimizer
    assert flat.params_in_place()
    train(range(5, 8))
    assert_same(params, oracle_params, opt.state, oracle_opt.state, exact=exact)


AROUND_THE_RUN = ["listed twice in a group", "listed in two groups", "count set through .data",
                  "count set through numpy"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", AROUND_THE_RUN)
@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_what_a_run_cannot_step_steps_as_torch(backend, case):
    """A param listed twice (in its group, or in a second group put into param_groups by hand) is stepped twice,
    one update after the other, on one state: a run, which steps each slot once with one counter, is not made.
    A step count written where the version counter does not see it (`.data`, numpy) is seen: the range is not
    stepped with another param's count. Against torch.optim.AdamW(foreach=False) on the same model, unflattened."""
    model, oracle = make_model(), make_model()
    flatten_parameters(model)
    opts = []
    for m in (model, oracle):
        ps = list(m.parameters())
        listed = ps + [ps[2]] if case == "listed twice in a group" else ps
        opt = (FusedAdamW(listed, lr=LR, weight_decay=WD, backend=backend) if m is model
               else torch.optim.AdamW(listed, lr=LR, weight_decay=WD, foreach=False))
        if case == "listed in two groups":
            opt.param_groups.append(dict(opt.param_groups[0], params=[ps[2]]))
        opts.append(opt)
    for step in range(5):
        for m, opt in zip((model, oracle), opts):
            if step == 2 and case.startswith("count"):
                count = opt.state[list(m.parameters())[4]]["step"]
                count.data.fill_(0) if case.endswith(".data") else count.numpy().fill(0)
            backward(m, step)
            opt.step()
            opt.zero_grad(set_to_none=False)
    assert_same(list(model.parameters()), list(oracle.parameters()), opts[0].state, opts[1].state,
                exact=backend == "reference")


class Branches(torch.nn.Module):
    """Two layers, of which a forward pass uses one, or both: a param without a grad in the middle of the buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)

    def forward(self, x, use_b: bool):
        return self.c(self.a(x) + (self.b(x) if use_b else 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b_from", [None, 2], ids=["never-used", "used-from-step-2"])
def test_a_param_without_a_grad_is_not_stepped(backend, b_from):
    """A param that has had no grad is skipped, as torch skips it: flattening gives no param a grad it did not have
    (a zero grad view would be stepped: its weight decayed, its count bumped, a state made), and the first grad
    autograd gives one is moved into its slot (NOTE [grad adoption]). Against torch.optim.AdamW(foreach=False)."""
    model, oracle = Branches(), Branches()
    (flat,) = flatten_parameters(model)
    assert all(p.grad is None for p in model.parameters())
    opt = FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, backend=backend)
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=WD, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a param without a grad splits the slots: said, as it should)
        for step in range(5):
            use_b = b_from is not None and step >= b_from
            for m, o in ((model, opt), (oracle, oracle_opt)):
                m(batch(step), use_b).square().sum().backward()
                o.step()
                o.zero_grad(set_to_none=False)
            assert (model.b.weight.grad is None) == (not use_b)
            assert flat.grads_in_place(0) and (flat.grads_in_place(2) == use_b)  # a.weight, b.weight
    assert_same(list(model.parameters()), list(oracle.parameters()), opt.state, oracle_opt.state,
                exact=backend == "reference")
    assert (model.b.weight in opt.state) == (b_from is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["frozen", "grad set to None, unused", "data replaced", "flattened again"])
def test_flat_buffer_zero_grad_as_torch(backend, case):
    """FlatBuffer.zero_grad() zeroes what torch's zero_grad(set_to_none=False) zeroes and nothing more: a param
    frozen (or whose grad was set to None) after flattening keeps no grad, and is not stepped; a param that left
    its slot keeps its own grad, zeroed (not accumulated step after step)."""
    model, oracle = make_model(), make_model()
    flats = flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, backend=backend)
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=WD, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the layout broken, or params without grads: said, as it should)
        for step in range(5):
            for m, o in ((model, opt), (oracle, oracle_opt)):
                if step == 2:
                    victim = m[0].weight
                    if case == "frozen":
                        victim.requires_grad_(False)
                        victim.grad = None
                    elif case == "grad set to None, unused":
                        m[4].weight.grad = None
                        m[4].weight.register_hook(lambda g: None if g is None else torch.zeros_like(g))
                    elif case == "data replaced":  # (out of its slot: its grad is its own from now on)
                        victim.data = victim.data.clone()
                        victim.grad = None
                    elif case == "flattened again" and m is model:
                        flatten_parameters(m)
                if case == "grad set to None, unused" and step >= 2:
                    m[4].weight.grad = None  # (the hook gave it a zero grad: it is never stepped again)
                backward(m, step)
                if case == "grad set to None, unused" and step >= 2:
                    m[4].weight.grad = None
                o.step()
                if m is model:
                    flats[0].zero_grad()
                else:
                    o.zero_grad(set_to_none=False)
            for p, q in zip(model.parameters(), oracle.parameters()):
                assert (p.grad is None) == (q.grad is None) and (p.grad is None or not p.grad.any()), step
    assert_same(list(model.parameters()), list(oracle.parameters()), opt.state, oracle_opt.state,
                exact=backend == "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["after the first step", "twice"])
def test_flattening_later_rebuilds_the_plan(backend, case):
    """flatten_parameters after the optimizer has stepped (or a second time) moves the params into new slots: the
    next step builds the plan again, finds the run, moves the existing states into flat state buffers, and steps
    flat, as torch's for-loop steps."""
    model, oracle = make_model(), make_model()
    if case == "twice":
        flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, amsgrad=True, backend=backend)
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=WD, amsgrad=True, foreach=False)
    flat_steps = []
    stepped = FlatRun.stepped
    with mock.patch.object(FlatRun, "stepped", autospec=True, side_effect=stepped) as counted:
        for step in range(5):
            if step == 2:
                (flat,) = flatten_parameters(model)
            for m, o in ((model, opt), (oracle, oracle_opt)):
                backward(m, step)
                o.step()
                o.zero_grad(set_to_none=False)
            flat_steps.append(counted.call_count)
    assert flat_steps == ([1, 2, 3, 4, 5] if case == "twice" else [0, 0, 1, 2, 3])
    assert flat.params_in_place() and flat.grads_in_place()
    run = opt._plans[0].parts[0].flat
    assert opt.state[model[0].weight]["exp_avg"].data_ptr() == run.buffers["exp_avg"].data_ptr()
    assert_same(list(model.parameters()), list(oracle.parameters()), opt.state, oracle_opt.state,
                exact=backend == "reference")


def test_a_lost_flat_step_is_said():
    """Where flattened params stop being stepped as one range for good, a warning says why, once: a param's .data
    replaced; states that one counter cannot step (a checkpoint where one param had no state)."""
    model = make_model()
    flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, backend="reference")
    for step in range(4):
        if step == 2:
            model[0].weight.data = model[0].weight.data.clone()
        backward(model, step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert [w.filename for w in caught] == ([__file__] if step == 2 else [])  # the user's line, not ours
        assert step != 2 or "no longer a view of its slot" in str(caught[0].message)
        opt.zero_grad(set_to_none=False)

    oracle = make_model()
    torch_opt = torch.optim.AdamW(oracle.parameters(), foreach=False)
    backward(oracle, 0)
    oracle[4].weight.grad = None  # no state for it
    torch_opt.step()
    model = make_model()
    flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), backend="reference")
    opt.load_state_dict(torch_opt.state_dict())
    backward(model, 1)
    with pytest.warns(UserWarning, match="states are not alike"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_string_step_count_raises_as_unflattened(backend):
    """A saved state whose step count is a string: flattened or not, the step raises naming it and changes nothing
    (the run does not adopt such a state)."""
    for flatten in (False, True):
        model = make_model()
        if flatten:
            flatten_parameters(model)
        opt = FusedAdamW(model.parameters(), lr=LR, backend=backend)
        backward(model, 0)
        opt.step()
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (states of their own now: the run adopts them)
        for p in model.parameters():  # (equal counts: a run would adopt them)
            opt.state[p]["step"] = "1"
        before = [t.clone() for t in model.parameters()]
        with pytest.raises(ValueError, match=r"state\['step'\] .* is '1'"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), flatten


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("victim", ["params", "grads", "state_steps"])
@pytest.mark.filterwarnings("ignore:fused_adam. the grads of")  # (the grads are not their views: said, as it should)
def test_flat_buffer_freed_raises_and_changes_nothing(backend, victim):
    """A flat buffer's storage freed under the views (`untyped_storage().resize_(0)`, as FSDP frees params), or the
    run's step counts' shrunk to the first count: the range is not stepped, the per-tensor pass names the first
    view whose elements are gone, nothing is written."""
    model = make_model()
    (flat,) = flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, weight_decay=WD, backend=backend)
    for step in range(2):
        backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=False)
    backward(model, 2)
    params = list(model.parameters())
    buffer = {"params": params[0], "grads": params[0].grad, "state_steps": opt.state[params[0]]["step"]}[victim]
    freed = buffer.untyped_storage().data_ptr()
    kept = [t for p in params for t in (p, p.grad, *opt.state[p].values()) if t.untyped_storage().data_ptr() != freed]
    before = [t.clone() for t in kept]
    keep = 4 if victim == "state_steps" else 0
    buffer.untyped_storage().resize_(keep)
    index = 1 if victim == "state_steps" else 0
    with pytest.raises(RuntimeError, match=rf"{victim}\[{index}\].* needs \d+ bytes of storage .* holds {keep}"):
        opt.step()
    for i, (a, b) in enumerate(zip(before, kept)):
        assert torch.equal(a, b), f"tensor {i} changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(master_weights=True), dict(state_dtype=torch.float32, amsgrad=True)],
                         ids=["master", "fp32-states"])
def test_flat_run_low_precision(backend, kw):
    """bf16 params with an fp32 master or fp32 states: the flat master / state buffers step bitwise as the same
    backend steps the params one by one."""
    model, ref = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    (flat,) = flatten_parameters(model)
    driver = FlatDriver(list(model.parameters()), backend, **kw)
    per_tensor = FlatDriver(list(ref.parameters()), backend, **kw)
    assert driver.run is not None and per_tensor.run is None
    for step in range(4):
        for m in (model, ref):
            backward(m, step)
        assert driver.step()
        per_tensor.step()
        flat.zero_grad()
        ref.zero_grad()
    assert_same(list(model.parameters()), list(ref.parameters()), driver.state, per_tensor.state)


def test_saved_and_copied_models_are_plain():
    """torch.save/load and deepcopy of a flattened model give a model that computes the same and is not flat (its
    params are not slots of the original's buffer): an optimizer over the copy steps it per tensor."""
    import io

    model = make_model()
    flatten_parameters(model)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    opts = PartOptions.of(group(), torch.float32, False)
    for other in (torch.load(saved, weights_only=False), copy.deepcopy(model)):
        assert torch.equal(other(batch(0)), model(batch(0)))
        params = list(other.parameters())
        assert all(getattr(p, ATTR, _Tag(None, -1)).flat is None for p in params)
        assert find_run(params, opts) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flattened_param_stepping_for_the_first_time_beside_stepped_ones_starts_at_step_0(backend):
    """Flat params: the last one has no grad at the first step (its grad set to None), so its state is made later,
    when the run's other params are at step 1. One counter cannot step both (NOTE [flat buffers]): the partition
    steps per tensor, and the new param starts at step 0 as in torch. Kills: flat.FlatRun.states without its
    `counts and any(not state.get(p) ...)` rule (the new param's count starts at 1: a wrong bias correction)."""
    params0 = make_params(torch.float32, [(7,), (3, 5), (4,)])
    ours_p = [torch.nn.Parameter(p.clone()) for p in params0]
    ref_p = [torch.nn.Parameter(p.clone()) for p in params0]
    (buffer,) = flatten_parameters(ours_p)
    ours = FusedAdamW(ours_p, lr=0.01, backend=backend)
    ref = torch.optim.AdamW(ref_p, lr=0.01, foreach=False)
    for s in range(4):
        if s == 1:
            buffer.zero_grad()  # the grad views back, the last param's too
        gs = make_grads(params0, s)
        for i, (a, b, g) in enumerate(zip(ours_p, ref_p, gs)):
            if s == 0 and i == 2:
                a.grad = b.grad = None
            else:
                a.grad.copy_(g) if a.grad is not None else setattr(a, "grad", g.clone())
                b.grad = g.clone()
        ours.step()
        ref.step()
        tol = dict(atol=0, rtol=0) if backend == "reference" else {}
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"step {s}, param {i}: {m}")
            assert set(ours.state.get(a, {})) == set(ref.state.get(b, {}))
            if b in ref.state:
                assert ours.state[a]["step"].item() == ref.state[b]["step"].item(), (s, i)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_sparse_grad_on_a_flattened_param(native):
    """A grad made sparse (by a hook or by hand): FlatBuffer.zero_grad() zeroes it as torch's
    zero_grad(set_to_none=False) does, and the step raises torch's sparse-grad error, naming it, with nothing
    written; the check in Python (a build without the extension) says "not in place" instead of failing on the
    sparse tensor's missing data pointer."""
    model, ref = make_model(), make_model()
    (flat,) = flatten_parameters(model)
    opt = FusedAdamW(model.parameters(), lr=LR, backend="reference")
    backward(model, 0)
    opt.step()
    if not native:
        opt._plans[0].parts[0].flat._native = None
    for m in (model, ref):
        backward(m, 1)
        m[0].bias.grad = m[0].bias.grad.to_sparse()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the grads are not their views: said)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    flat.zero_grad()
    ref.zero_grad(set_to_none=False)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.layout == q.grad.layout and not p.grad.to_dense().any()


def test_a_first_grad_that_is_a_view_of_other_memory_is_not_adopted():
    """NOTE [grad adoption]: a param's first grad is moved into its slot only where it owns its memory; one that is
    a view of another buffer (DDP's bucket with gradient_as_bucket_view) stays its owner's. A grad of its own is
    adopted."""
    owned, viewed = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    (flat,) = flatten_parameters([owned, viewed])
    bucket = torch.zeros(16)
    viewed.register_hook(lambda g: bucket[3:8].copy_(g))  # autograd keeps the hook's result: a view of the bucket
    (owned.sum() + viewed.sum()).backward()
    assert flat.grads_in_place(0) and not flat.grads_in_place(1)
    assert viewed.grad.data_ptr() == bucket[3:].data_ptr() and torch.equal(viewed.grad, torch.ones(5))
