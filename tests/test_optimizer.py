"""The optimizer layer: torch's argument checks and errors, state_dict both ways, pickling, AMP, schedulers,
param groups, odd params (no grad, sparse, complex, non-contiguous, mixed dtypes) and backend dispatch.
Runs on the default backend ("auto") unless a test names one."""
import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import optim_error_inputs_func_adam

import fused_adam
from fused_adam import FusedAdam, FusedAdamW, backends
from parity import make_grads, make_params

BACKENDS_HERE = ["auto", "reference"] + (["cpu"] if backends.unavailable("cpu") is None else [])


def _train(opt, params, steps, start=0, seed=0):
    for s in range(start, start + steps):
        for p, g in zip(params, make_grads(params, s, seed)):
            p.grad = g
        opt.step()


def _clone(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def _assert_same(opt_a, pa, opt_b, pb, exact=True):
    tol = dict(atol=0, rtol=0) if exact else {}
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            torch.testing.assert_close(sa[k].float() if k == "step" else sa[k], sb[k].float() if k == "step" else sb[k], **tol)


# ---- torch's own error inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
@pytest.mark.parametrize(
    "error_input", optim_error_inputs_func_adam("cpu", torch.float32), ids=lambda e: e.optimizer_error_input.desc
)
def test_torch_error_inputs(cls, error_input):
    oi = error_input.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            cls(params, **oi.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            cls(params, **oi.kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        (dict(fused=True, differentiable=True), "`fused` does not support `differentiable`"),
        (dict(fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together"),
    ],
)
def test_errors_match_torch(kwargs, message):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as theirs:
        torch.optim.Adam(p, **kwargs)
    with pytest.raises(type(theirs.value), match=message):
        FusedAdam(p, **kwargs)
    assert re.search(message, str(theirs.value))


def test_multi_element_tensor_beta_names_the_argument():
    # torch.optim.Adam compares the whole tensor with 0 first and fails with "Boolean value of Tensor ... is
    # ambiguous"; we check the size first and say which argument is wrong.
    with pytest.raises(ValueError, match=r"Tensor betas\[1\] must be 1-element"):
        FusedAdam([torch.nn.Parameter(torch.randn(3))], betas=(torch.tensor(0.9), torch.tensor([0.9, 0.8])))


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=torch.tensor(1e-8)), r"param_groups\[0\]\['eps'\] is tensor"),
    (dict(weight_decay=torch.tensor(0.1)), r"param_groups\[0\]\['weight_decay'\] is tensor"),
    (dict(master_weights=1), r"Invalid master_weights: 1"),
])
def test_what_a_step_refuses_the_constructor_refuses(kwargs, match):
    """A Tensor eps or weight_decay (torch's for-loop takes them; its fused and capturable paths do not): the step
    checks every group as the constructor does, so the constructor refuses what every step would."""
    with pytest.raises(ValueError, match=match):
        FusedAdam([torch.nn.Parameter(torch.randn(3))], **kwargs)
    with pytest.raises(ValueError, match=match):
        FusedAdam([{"params": [torch.nn.Parameter(torch.randn(3))], **kwargs}])


def test_defaults_match_torch():
    p = [torch.nn.Parameter(torch.randn(3))]
    for ours, theirs in ((FusedAdam(p), torch.optim.Adam(p)), (FusedAdamW(p), torch.optim.AdamW(p))):
        assert ours.defaults == theirs.defaults
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()


def test_unknown_backend_names_the_value():
    with pytest.raises(ValueError, match=r"Invalid backend: 'gpu'.*reference"):
        FusedAdam([torch.nn.Parameter(torch.randn(2))], backend="gpu")


# ---- backends and dispatch ------------------------------------------------------------------------------------


def test_auto_records_backend_and_reasons():
    p = torch.nn.Parameter(torch.randn(5))
    opt = FusedAdam([p])
    assert opt.dispatch == [[]]
    p.grad = torch.randn(5)
    opt.step()
    (d,) = opt.dispatch[0]
    expected = backends.candidates(torch.device("cpu"))
    assert d.backend in expected and d.device.type == "cpu" and d.dtype == torch.float32 and d.num_params == 1
    for skipped_name in expected[: expected.index(d.backend)]:
        assert d.skipped[skipped_name]  # every backend auto passed over says why


def test_explicit_backend_that_cannot_run_raises_with_reason_and_list():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    for name in ("cuda", "triton", "cpu"):
        reason = backends.unavailable(name)
        if reason is not None:
            with pytest.raises(RuntimeError, match=rf"backend='{name}' is unavailable: .*Available backends: .*reference"):
                FusedAdam([p], backend=name)
        else:
            probe = FusedAdam([p], backend="reference")
            probe.step()
            why = backends.get(name).supports(probe._plans[0].parts[0])
            if why is not None:
                opt = FusedAdam([p], backend=name)
                with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot run param group 0.*Available backends"):
                    opt.step()


def test_available_backends_lists_reference():
    assert "reference" in fused_adam.available_backends()


# ---- params: no grad, sparse, complex, layouts, dtypes ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_params_without_grad_are_skipped_and_get_no_state(backend):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    before = b.detach().clone()
    opt = FusedAdam([a, b], backend=backend)
    a.grad = torch.randn(4)
    opt.step()
    assert len(opt.state[a]) > 0 and b not in opt.state
    assert torch.equal(b, before)
    b.grad = torch.randn(4)  # a param that gains a grad later starts its own step count
    opt.step()
    assert float(opt.state[a]["step"]) == 2 and float(opt.state[b]["step"]) == 1


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_sparse_grad_points_to_sparse_adam(backend):
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*param 0.*torch\.optim\.SparseAdam"):
        FusedAdam([p], backend=backend).step()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_sparse_grad_after_steps_changes_nothing(backend):
    """A sparse grad in a cached plan (the cpu kernel finds it, the optimizer words the error): nothing moves."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(4, 3))]
    opt = FusedAdam(params, backend=backend)
    _train(opt, params, 2)
    before = [p.detach().clone() for p in params]
    params[0].grad, params[1].grad = torch.randn(5), torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*param 1 in group 0"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b) and float(opt.state[p]["step"]) == 2


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("kwargs", [{}, dict(weight_decay=0.1, amsgrad=True, maximize=True)])
def test_complex_params(backend, kwargs):
    params = [torch.randn(3, 4, dtype=torch.complex64), torch.randn(5, dtype=torch.complex64)]
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdam(ours_p, backend=backend, **kwargs), torch.optim.Adam(ref_p, **kwargs)
    _train(ours, ours_p, 10)
    _train(ref, ref_p, 10)
    # torch adds L2 weight decay in complex arithmetic (wd * p as a complex product), we on the real view:
    # the same value up to an ulp.
    _assert_same(ours, ours_p, ref, ref_p, exact=backend == "reference" and not kwargs)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_non_contiguous_params_and_grads(backend):
    base = torch.randn(6, 8)
    params = [base.t().contiguous().t(), torch.randn(8, 6)[:, ::2], torch.randn(5, 7).t()]  # transposed, strided
    ours_p = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in params]
    ref_p = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in params]
    ours, ref = FusedAdamW(ours_p, backend=backend), torch.optim.AdamW(ref_p, foreach=False)
    for s in range(5):
        for a, b, g in zip(ours_p, ref_p, make_grads(params, s)):
            a.grad, b.grad = g.contiguous(), g.contiguous()  # grad strides differ from the param's
        ours.step()
        ref.step()
    _assert_same(ours, ours_p, ref, ref_p, exact=backend == "reference")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_mixed_dtypes_in_one_group(backend):
    params = make_params(torch.float32, [(3,), (4, 2)]) + make_params(torch.float64, [(5,)]) + make_params(torch.bfloat16, [(7,)])
    ours_p, ref_p = _clone(params), _clone(params)
    ours = FusedAdam(ours_p, weight_decay=0.1, backend=backend)
    ref = torch.optim.Adam(ref_p, weight_decay=0.1)
    _train(ours, ours_p, 5)
    _train(ref, ref_p, 5)
    assert {d.dtype for d in ours.dispatch[0]} == {torch.float32, torch.float64, torch.bfloat16}
    _assert_same(ours, ours_p[:3], ref, ref_p[:3], exact=backend == "reference")
    torch.testing.assert_close(ours_p[3].detach(), ref_p[3].detach(), atol=2e-2, rtol=2e-2)


def test_many_groups_with_own_options():
    params = make_params(torch.float32, [(3,), (4,), (5,)])
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.1, "amsgrad": True}, {"params": [ps[2]], "weight_decay": 0.5}]  # noqa: E731
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdam(groups(ours_p)), torch.optim.Adam(groups(ref_p))
    _train(ours, ours_p, 8)
    _train(ref, ref_p, 8)
    _assert_same(ours, ours_p, ref, ref_p, exact=False)


def test_changing_options_between_steps():
    """lr from a scheduler, amsgrad switched on, a param group added: the cached step plan follows."""
    params = make_params(torch.float32, [(4,), (6,)])
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdam(ours_p[:1]), torch.optim.Adam(ref_p[:1])
    _train(ours, ours_p[:1], 3)
    _train(ref, ref_p[:1], 3)
    for o in (ours, ref):
        o.param_groups[0]["lr"] = 0.05
    ours.add_param_group({"params": [ours_p[1]], "weight_decay": 0.1})
    ref.add_param_group({"params": [ref_p[1]], "weight_decay": 0.1})
    _train(ours, ours_p, 3, start=3)
    _train(ref, ref_p, 3, start=3)
    _assert_same(ours, ours_p, ref, ref_p, exact=False)


def test_replaced_state_tensor_is_used():
    p = torch.nn.Parameter(torch.randn(4))
    opt = FusedAdam([p])
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["exp_avg"] = torch.full((4,), 7.0)  # the cached plan must not keep the old tensor
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((4,), 0.9 * 7.0 + 0.1))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_param_storage_swapped_under_the_optimizer_is_used(backend):
    """`p.data = ...` keeps the param object (and the cached plan, and the cpu backend's converted lists) but
    moves its storage: the next step must update the new storage."""
    params = make_params(torch.float32, [(5,), (3, 2)])
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdamW(ours_p, backend=backend), torch.optim.AdamW(ref_p, foreach=False)
    _train(ours, ours_p, 2)
    _train(ref, ref_p, 2)
    fresh = torch.randn(3, 2)
    ours_p[1].data, ref_p[1].data = fresh.clone(), fresh.clone()
    _train(ours, ours_p, 3, start=2)
    _train(ref, ref_p, 3, start=2)
    _assert_same(ours, ours_p, ref, ref_p, exact=backend == "reference")
    assert not torch.equal(ours_p[1].detach(), fresh)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_grads_read_by_the_kernel_follow_python(backend):
    """NOTE [grads read in C++]: new grad tensors each step, a param losing its grad (no update, no step) and
    getting one back: the same as torch."""
    params = make_params(torch.float32, [(5,), (3, 2), (7,)])
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdamW(ours_p, backend=backend), torch.optim.AdamW(ref_p, foreach=False)
    for s in range(8):
        grads = make_grads(params, s)
        for i, (a, b, g) in enumerate(zip(ours_p, ref_p, grads)):
            a.grad = b.grad = None if (i == 1 and s in (3, 4)) else g.clone()
        ours.step()
        ref.step()
        if backend == "cpu" and s >= 1:
            assert ours._plans[0].parts[0].reads_grads == (s not in (3, 4))
    _assert_same(ours, ours_p, ref, ref_p, exact=backend == "reference")


def test_grads_read_by_the_kernel_with_thousands_of_params():
    """Past 2048 params the kernel reads the grads in both threads; one missing grad still means: no update and
    no step for that param, as in torch."""
    params = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(3000)]
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdamW(ours_p, backend="auto"), torch.optim.AdamW(ref_p, foreach=False)
    for s in range(4):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            a.grad = b.grad = None if (s == 2 and i == 2500) else torch.full((3,), 0.1 * (s + 1) + 1e-4 * i)
        ours.step()
        ref.step()
    _assert_same(ours, ours_p, ref, ref_p, exact=False)
    assert float(ours.state[ours_p[2500]]["step"]) == 3 and float(ours.state[ours_p[0]]["step"]) == 4


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_states_are_packed_views_in_torchs_layout(backend):
    """NOTE [packed states]: the states of contiguous params are 64-byte aligned views into one buffer per kind;
    a non-contiguous param gets its own, with the param's strides (torch's preserve_format)."""
    sizes = [(1,), (17,), (3, 5), (0,), (64,)]
    params = make_params(torch.float32, sizes) + [torch.randn(6, 4).t().requires_grad_()]
    opt = FusedAdam(params, amsgrad=True, backend=backend)
    _train(opt, params, 2)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        states = [opt.state[p][key] for p in params]
        assert len({s.untyped_storage().data_ptr() for s in states[:-1]}) == 1, key
        assert states[-1].untyped_storage().data_ptr() != states[0].untyped_storage().data_ptr()
        for p, s in zip(params, states):
            assert (s.shape, s.stride(), s.dtype) == (p.shape, p.stride(), p.dtype), key
            assert s.data_ptr() % 64 == 0 or s.numel() == 0, key
    steps = [opt.state[p]["step"] for p in params]
    assert len({s.untyped_storage().data_ptr() for s in steps[:-1]}) == 1
    assert all(s.dim() == 0 and s.dtype == torch.float32 and float(s) == 2 for s in steps)
    ref_p = _clone([p.detach() for p in params])
    for a, b in zip(ref_p, params):
        a.data = b.detach().clone(memory_format=torch.preserve_format)
    # the packed states hold the same values as per-param ones: continue from a torch copy of the state
    ref = torch.optim.Adam(ref_p, amsgrad=True, foreach=False)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(opt, params, 3, start=2)
    _train(ref, ref_p, 3, start=2)
    _assert_same(opt, params, ref, ref_p, exact=backend == "reference")


def test_packed_state_buffers_are_bounded(monkeypatch):
    """Buffers hold at most PACK_BUFFER elements (torch.save of one view writes its whole buffer); params above
    PACK_MAX_NUMEL get states of their own."""
    monkeypatch.setattr(fused_adam.state, "PACK_BUFFER", 40)
    monkeypatch.setattr(fused_adam.state, "PACK_MAX_NUMEL", 30)
    params = make_params(torch.float32, [(10,), (20,), (15,), (5,), (31,), (3,), (2,)])
    opt = FusedAdamW(params)
    _train(opt, params, 1)
    storage = [opt.state[p]["exp_avg_sq"].untyped_storage() for p in params]
    ptrs = [s.data_ptr() for s in storage]
    # buckets: [10, 20] (+15 would exceed 40), then [15, 5, 3, 2]; 31 is too large to pack
    assert ptrs[0] == ptrs[1] and ptrs[2] == ptrs[3] == ptrs[5] == ptrs[6]
    assert len({ptrs[0], ptrs[2], ptrs[4]}) == 3
    assert storage[4].nbytes() == 31 * 4
    assert storage[0].nbytes() == (16 + 32) * 4 and storage[2].nbytes() == 4 * 16 * 4  # slots rounded up to 64 B


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if backends.unavailable("cpu") is None else []))
def test_packed_master_weights_start_as_the_params(backend):
    params = make_params(torch.bfloat16, [(7,), (2, 33)])
    opt = FusedAdamW([p.detach().clone().requires_grad_() for p in params], lr=0.0, weight_decay=0.0,
                     master_weights=True, backend=backend)
    ps = opt.param_groups[0]["params"]
    _train(opt, ps, 1)
    masters = [opt.state[p]["master_param"] for p in ps]
    assert masters[0].untyped_storage().data_ptr() == masters[1].untyped_storage().data_ptr()
    for p, m in zip(params, masters):
        assert m.dtype == torch.float32 and torch.equal(m, p.detach().float())


# ---- state_dict, pickle, deepcopy ----------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_round_trip_with_torch(direction, amsgrad):
    params = make_params(torch.float32, [(3, 4), (5,)])
    kw = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad)
    first_cls, second_cls = (torch.optim.AdamW, FusedAdamW) if direction == "torch->ours" else (FusedAdamW, torch.optim.AdamW)
    first_p = _clone(params)
    first = first_cls(first_p, **kw)
    _train(first, first_p, 5)
    sd = first.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors and dicts only: loadable without our classes
    second_p = [p.detach().clone().requires_grad_() for p in first_p]
    second = second_cls(second_p, **kw)
    second.load_state_dict(sd)
    _train(first, first_p, 5, start=5)
    _train(second, second_p, 5, start=5)
    _assert_same(first, first_p, second, second_p, exact=False)


def test_state_dict_layout_is_torchs():
    params = make_params(torch.float32, [(3,), (2, 2)])
    ours_p, ref_p = _clone(params), _clone(params)
    ours, ref = FusedAdam(ours_p, amsgrad=True), torch.optim.Adam(ref_p, amsgrad=True)
    _train(ours, ours_p, 2)
    _train(ref, ref_p, 2)
    a, b = ours.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert type(a["state"][k]) is dict
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, t in a["state"][k].items():
            u = b["state"][k][name]
            assert (t.shape, t.stride(), t.dtype, t.device) == (u.shape, u.stride(), u.dtype, u.device), name


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle(how):
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW(model.parameters(), lr=0.01, backend="reference")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.backend == "reference"
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_load_state_dict_keeps_backend_and_forces_decoupled():
    p = [torch.nn.Parameter(torch.randn(3))]
    adam = torch.optim.Adam(p)
    ours = FusedAdamW([torch.nn.Parameter(torch.randn(3))], backend="reference")
    ours.load_state_dict(adam.state_dict())
    assert ours.backend == "reference"
    assert ours.param_groups[0]["decoupled_weight_decay"] is True


# ---- AMP, schedulers, hooks, closures --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scaler_matches_torch_fused(backend, dtype):
    """Under torch.amp.GradScaler("cpu"), including a step whose grads hold an inf: the step is skipped,
    the scale backs off, and training continues exactly as torch's fused Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).to(dtype)
    model2 = copy.deepcopy(model)
    ours = FusedAdam(model.parameters(), lr=0.01, weight_decay=0.1, backend=backend)
    ref = torch.optim.Adam(model2.parameters(), lr=0.01, weight_decay=0.1, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    data = [(torch.randn(4, 8, dtype=dtype), torch.randn(4, 1, dtype=dtype)) for _ in range(8)]
    for i, (x, y) in enumerate(data):
        for m, o, sc in ((model, ours, scalers[0]), (model2, ref, scalers[1])):
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            sc.scale(loss).backward()
            if i == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    if dtype == torch.float32:
        param_tol = dict(atol=1e-6, rtol=1e-5) if backend == "reference" else dict(atol=1e-5, rtol=1e-4)
        grad_tol = dict(atol=1e-6, rtol=1e-5)
    else:
        param_tol = grad_tol = dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, **param_tol)
        assert float(ours.state[a]["step"]) == float(ref.state[b]["step"]) == 7  # the inf step did not count
        torch.testing.assert_close(a.grad, b.grad, **grad_tol)  # unscaled in place


def test_explicit_grad_scale_and_found_inf_arguments():
    p = torch.nn.Parameter(torch.randn(4))
    opt = FusedAdam([p], backend="reference")
    p.grad = torch.full((4,), 8.0)
    before = p.detach().clone()
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert torch.equal(p, before) and torch.equal(p.grad, torch.full((4,), 8.0)) and float(opt.state[p]["step"]) == 0
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    assert torch.equal(p.grad, torch.full((4,), 2.0)) and float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("cls, torch_cls", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
def test_lr_scheduler(cls, torch_cls):
    params = make_params(torch.float32, [(5,), (2, 3)])
    runs = []
    for c in (cls, torch_cls):
        ps = _clone(params)
        opt = c(ps, lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)
        lrs = []
        for s in range(12):
            for p, g in zip(ps, make_grads(ps, s)):
                p.grad = g
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((ps, opt, lrs))
    assert runs[0][2] == runs[1][2]
    _assert_same(runs[0][1], runs[0][0], runs[1][1], runs[1][0], exact=False)


def test_step_wrapper_hooks_and_profiler_label_as_torch():
    """NOTE [step wrapper]: FusedAdam's own step wrapper runs the global and per-optimizer pre/post hooks in
    torch's order (a pre-hook may replace the arguments), labels the step for the profiler as torch does, and a
    subclass that overrides step() runs its hooks once."""

    def run(cls, **kw):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.1, **kw)
        calls = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", len(a)))),
            register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", len(a)))),
            opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", a[0] is o))),
            opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[0] is o))),
        ]
        try:
            p.grad = torch.ones(3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                opt.step()
            # A pre-hook that replaces the arguments: the closure it passes is what the step calls.
            handles.append(opt.register_step_pre_hook(lambda o, a, k: ((a[0], lambda: calls.append("closure")), k)))
            opt.step()
        finally:
            for h in handles:
                h.remove()
        labels = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
        return calls, labels, p.detach()

    ours_calls, ours_labels, ours_p = run(FusedAdamW)
    torch_calls, torch_labels, torch_p = run(torch.optim.AdamW, foreach=False)
    assert ours_calls == torch_calls and "closure" in ours_calls
    assert ours_labels == ["Optimizer.step#FusedAdamW.step"] and torch_labels == ["Optimizer.step#AdamW.step"]
    assert torch.equal(ours_p, torch_p)

    class Sub(FusedAdam):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.nn.Parameter(torch.ones(3))
    opt = Sub([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"] and float(opt.state[p]["step"]) == 1


def test_closure_hooks_and_zero_grad():
    p = torch.nn.Parameter(torch.randn(3))
    opt = FusedAdam([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and loss.item() > 0
    opt.zero_grad()
    assert p.grad is None


def test_differentiable_step_matches_torch():
    """differentiable=True: the steps are part of the autograd graph, as torch's (reference backend), with two
    small params (whose states are not packed: autograd refuses in-place updates of views made under no_grad)."""
    leaves = [torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                     requires_grad=True)]

    def stepped(cls):
        xs = [p.clone() for p in leaves]  # non-leaves, as in torch's own differentiable-optimizer tests
        opt = cls(xs, lr=0.1, weight_decay=0.1, differentiable=True)  # (amsgrad: torch's own fails past a step)
        for s in range(3):
            for x in xs:
                x.grad = torch.linspace(-1, 1 + s, x.numel(), dtype=torch.float64)
            opt.step()
        return xs, opt

    (a, ours), (b, _) = stepped(FusedAdam), stepped(torch.optim.Adam)
    assert ours.dispatch[0][0].backend == "reference"
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(sum(x.sum() for x in a), leaves)
    gb = torch.autograd.grad(sum(x.sum() for x in b), leaves)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("cls_kwargs", [(FusedAdam, {}), (FusedAdamW, {}), (FusedAdam, dict(decoupled_weight_decay=True))],
                         ids=["Adam", "AdamW", "Adam decoupled"])
def test_differentiable_step_with_betas_that_require_grad(cls_kwargs):
    """Tensor betas that require grad: torch raises each beta to a clone of the step count, which the next step bumps
    in place; raised to the count itself, the backward of three steps failed ("modified by an inplace operation")."""
    cls, kwargs = cls_kwargs
    torch_cls = {FusedAdam: torch.optim.Adam, FusedAdamW: torch.optim.AdamW}[cls]

    def stepped(make):
        p0 = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
        b1, b2 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.9, 0.99))
        x = p0.clone()
        opt = make([x], lr=0.1, betas=(b1, b2), weight_decay=0.1, differentiable=True, **kwargs)
        for s in range(3):
            x.grad = torch.linspace(-1, 1 + s, 6, dtype=torch.float64)[1:]  # (no zero: d sqrt(v)/dv at v = 0)
            opt.step()
        return x, torch.autograd.grad(x.sum(), (p0, b1, b2))

    (a, ga), (b, gb) = stepped(cls), stepped(torch_cls)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_duplicate_params_warn_like_torch():
    p = torch.nn.Parameter(torch.randn(2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        FusedAdam([p, p])
    assert any("duplicate parameters" in str(x.message) for x in w)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_duplicate_params_are_updated_twice_in_order_like_torchs_for_loop(backend):
    """A param listed twice gets two updates, one after the other (its step count goes up by two), as in torch's
    for-loop. Group [x, a, a, y] of equal sizes: in one call the cpu kernel's first thread would do x then a while
    the second did a's second update first (then y), the two updates in the wrong order."""
    n = 1 << 20
    params = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(3)]  # x, a, y
    ours_p, ref_p = _clone(params), _clone(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "duplicate parameters" warning
        ours = FusedAdamW([ours_p[0], ours_p[1], ours_p[1], ours_p[2]], lr=0.1, backend=backend)
        ref = torch.optim.AdamW([ref_p[0], ref_p[1], ref_p[1], ref_p[2]], lr=0.1, foreach=False)
    for s in range(3):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            a.grad = torch.randn(n, generator=torch.Generator().manual_seed(10 * s + i))
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    _assert_same(ours, ours_p, ref, ref_p, exact=backend == "reference")
    assert [float(ours.state[p]["step"]) for p in ours_p] == [3, 6, 3]


def _new_modules(setup: str, code: str) -> list[str]:
    import subprocess
    import sys

    probe = (f"import sys, torch\n{setup}\nbefore = set(sys.modules)\n{code}\n"
             "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('triton', 'sympy') "
             "or m.startswith(('torch._dynamo', 'torch.distributed.tensor'))))")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def test_import_pulls_in_nothing_a_step_may_not_need():
    """`import fused_adam` costs little on top of torch: no triton (CPU users never run it), no torch._dynamo (only a
    compiled step needs it), no torch.distributed.tensor or sympy (DTensor support looks the class up only once a
    user has imported it). A FusedAdamW step then imports nothing torch.optim.AdamW's does not. Checked by module,
    not by time: timings here drift."""
    assert _new_modules("", "import fused_adam") == "[]"
    torch_step = ("p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3); "
                  "torch.optim.AdamW([p]).step()")
    ours_step = ("import fused_adam; p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3); "
                 "fused_adam.FusedAdamW([p]).step()")
    assert _new_modules(torch_step, ours_step) == "[]"


@pytest.mark.parametrize("make", [lambda: torch.randn(3, dtype=torch.complex64), lambda: torch.randn(3, device="meta")],
                         ids=["complex", "meta"])
def test_fused_true_rejects_what_torchs_fused_path_rejects(make):
    """fused=True asks for torch's fused semantics: the params torch's fused Adam refuses raise torch's error at the
    first step, before anything changes; the default (fused=None) runs complex params."""
    ours_p, ref_p = torch.nn.Parameter(make()), torch.nn.Parameter(make())
    for p in (ours_p, ref_p):
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.Adam([ref_p], fused=True).step()
    ours = FusedAdam([ours_p], fused=True)
    with pytest.raises(RuntimeError) as ours_err:
        ours.step()
    assert str(ours_err.value) == str(theirs.value)
    assert not ours.state.get(ours_p)
