"""The CPU backend (fused_adam._C, csrc/cpu): parity with torch, and the sizes, layouts, threads, ISAs and inputs
that a SIMD loop over a chunk table can get wrong."""
from __future__ import annotations

import itertools
import sys
import threading
import time

import pytest
import torch
from conftest import requires_native
from cpu_kernel import (_C, assert_bitwise, assert_same_bits, cpu_isa, group_of, kernel_step, make_part, num_threads,
                        op_step, supported_isas, ulp_distance)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity import DTYPES, OPTIM_INPUTS, assert_parity, train

from fused_adam import FusedAdam, FusedAdamW
from fused_adam.backends import Hyper, PartOptions
from fused_adam.backends.cpu import BACKEND

pytestmark = requires_native

EVERYTHING = dict(weight_decay=0.1, amsgrad=True, maximize=True)  # + decoupled via FusedAdamW
LOW_PRECISION = (torch.bfloat16, torch.float16)


def tensors_of(params, opt) -> list[torch.Tensor]:
    out = []
    for p in params:
        out.append(p.detach())
        out.extend(v for k, v in sorted(opt.state[p].items()))
    return out


def assert_close_to_reference(ours: list[torch.Tensor], ref: list[torch.Tensor], max_ulps: int = 2):
    """fp32/fp64: assert_close's defaults. bf16/fp16: both backends compute in fp32 and round once per store, so
    they may differ only where a last-bit difference in fp32 flips a rounding: a few ulps of the storage dtype."""
    for i, (x, y) in enumerate(zip(ours, ref)):
        if x.dtype in LOW_PRECISION:
            d = ulp_distance(x, y)
            assert d.numel() == 0 or d.max().item() <= max_ulps, f"tensor {i}: {d.max().item()} ulps apart"
        else:
            torch.testing.assert_close(x, y, msg=lambda m: f"tensor {i}: {m}")


# ---- parity with torch.optim.Adam/AdamW: the shared table -----------------------------------------------------


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_cpu_matches_torch(optim_input, dtype, cls_name):
    assert_parity("cpu", cls_name, optim_input.kwargs, dtype)


def test_auto_picks_cpu():
    p = torch.zeros(3, requires_grad=True)
    opt = FusedAdam([p])
    p.grad = torch.ones(3)
    opt.step()
    assert [d.backend for d in opt.dispatch[0]] == ["cpu"]


def test_supports_reasons():
    def reason(device="cpu", dtype=torch.float32, **group):
        options = PartOptions.of(group_of(dtype, **group), dtype, clip=False)
        return BACKEND.supports(make_part([], [], [], [], [], options, device=device))

    assert reason() is None
    assert "cpu tensors only" in reason(device="cuda")
    assert "int" in reason(dtype=torch.int32)
    assert "reference" in reason(differentiable=True)
    assert reason(capturable=True) is None
    assert reason(dtype=torch.bfloat16, state_dtype=torch.float32, stochastic_rounding=True) is None
    assert "not instantiated" in reason(dtype=torch.float32, state_dtype=torch.float16)


# ---- sizes: SIMD tails, chunk boundaries, many tensors ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tail_size(dtype):
    """Sizes 1..67 cover every vector tail of 16-wide fp32 and 8-wide fp64 (main loop, masked/scalar epilogue).
    Element j of every tensor starts from the same values, so it must end bitwise the same in all of them."""
    base = torch.randn(67, dtype=torch.float64)
    params0 = [base[:n].clone().to(dtype) for n in range(1, 68)]
    params = [p.clone().requires_grad_() for p in params0]
    opt = FusedAdamW(params, backend="cpu", lr=0.01, **EVERYTHING)
    ref_p, ref = train("reference", params0, steps=0, lr=0.01, **EVERYTHING)
    g = torch.randn(67, dtype=torch.float64)
    for _ in range(3):
        for p, r in zip(params, ref_p):
            p.grad = g[: p.numel()].to(dtype)
            r.grad = g[: r.numel()].to(dtype)
        opt.step()
        ref.step()
    longest = tensors_of(params[-1:], opt)
    for p in params:
        for t, full in zip(tensors_of([p], opt), longest):
            assert torch.equal(t, full if full.dim() == 0 else full[: t.numel()]), p.numel()
    assert_close_to_reference(tensors_of(params, opt), tensors_of(ref_p, ref))


def test_chunk_boundaries():
    """chunk_size +-1, exact multiples and one past two chunks, through the optimizer (default chunk size) and
    with a tiny chunk size through the op, which must not change a single bit."""
    C = _C()
    cs = C.DEFAULT_CHUNK_SIZE
    sizes = [cs - 1, cs, cs + 1, 2 * cs + 1, 2 * cs, 3]
    params0 = [torch.randn(n) for n in sizes]
    ours_p, ours = train("cpu", params0, steps=2, **EVERYTHING)
    ref_p, ref = train("reference", params0, steps=2, **EVERYTHING)
    assert_close_to_reference(tensors_of(ours_p, ours), tensors_of(ref_p, ref))

    def direct(chunk_size):
        ps = [p.clone() for p in params0]
        gs = [torch.full_like(p, 0.5) for p in ps]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        steps = [torch.tensor(0.0) for _ in ps]
        kernel_step(ps, gs, ms, vs, [], steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                     amsgrad=False, maximize=False, decoupled=False, chunk_size=chunk_size)
        return ps + ms + vs

    assert_bitwise(direct(cs), direct(7))
    assert_bitwise(direct(cs), direct(cs - 1))


def test_many_tensors_and_threads():
    """800 tensors (empty ones among them) whose elements split across threads inside and between tensors:
    1 and 2 threads give the same bits."""
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 200, (800,), generator=gen).tolist() + [100_003]
    params0 = [torch.randn(n, generator=gen) for n in sizes]
    with num_threads(1):
        one_p, one = train("cpu", params0, steps=2, **EVERYTHING)
    with num_threads(2):
        two_p, two = train("cpu", params0, steps=2, **EVERYTHING)
    assert_bitwise(tensors_of(one_p, one), tensors_of(two_p, two))
    ref_p, ref = train("reference", params0, steps=2, **EVERYTHING)
    assert_close_to_reference(tensors_of(two_p, two), tensors_of(ref_p, ref))


def test_mixed_dtypes_in_one_group():
    shapes = [(5,), (3, 4), (67,), (2, 0)]
    params0 = [torch.randn(s).to(dt) for dt in DTYPES for s in shapes]
    ours_p, ours = train("cpu", params0, steps=3, cls=FusedAdam, **EVERYTHING)
    ref_p, ref = train("reference", params0, steps=3, cls=FusedAdam, **EVERYTHING)
    assert sorted(str(d.dtype) for d in ours.dispatch[0]) == sorted(str(d) for d in DTYPES)
    assert {d.backend for d in ours.dispatch[0]} == {"cpu"}
    assert_close_to_reference(tensors_of(ours_p, ours), tensors_of(ref_p, ref))


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "baseline"])
def test_every_isa_gives_the_same_bits(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    params0 = [torch.randn(n).to(dt) for dt in DTYPES for n in (1, 15, 17, 33, 67, 1000)]
    auto_p, auto = train("cpu", params0, steps=2, **EVERYTHING)
    with cpu_isa(isa):
        assert _C().cpu_isa() == isa
        isa_p, isa_opt = train("cpu", params0, steps=2, **EVERYTHING)
    assert_bitwise(tensors_of(auto_p, auto), tensors_of(isa_p, isa_opt))


def test_bad_isa_name():
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        _C().set_cpu_isa("sse9")


# ---- layouts --------------------------------------------------------------------------------------------------


def test_non_contiguous_params_and_grads():
    """Transposed params with contiguous grads (torch 2.13's fused CPU Adam gets this wrong), channels_last params,
    and params that are strided views of a bigger buffer; against the reference."""
    buf = torch.randn(6, 20)
    params0 = [
        torch.randn(7, 5).t(),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        buf[:, ::3],
        torch.randn(64, 33).t(),
    ]

    def run(backend):
        params = [p.detach().clone().requires_grad_() for p in params0]
        params[0] = params0[0].detach().clone().t().contiguous().t().requires_grad_()  # keep the transposed layout
        params[2] = torch.randn(6, 20)[:, ::3].copy_(params0[2]).requires_grad_()
        opt = FusedAdamW(params, backend=backend, **EVERYTHING)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).contiguous()  # strides differ from the param's
            opt.step()
        return params, opt

    ours_p, ours = run("cpu")
    ref_p, ref = run("reference")
    assert not ours_p[0].is_contiguous() and not ours_p[2].is_contiguous()
    assert_close_to_reference(tensors_of(ours_p, ours), tensors_of(ref_p, ref))


def test_non_contiguous_grad_is_unscaled_in_place():
    p = torch.randn(4, 6)
    g_buf = torch.randn(6, 4) * 1024
    g = g_buf.t()  # a view: the unscaled grad must land in g_buf
    expected = g.clone() / 1024
    C = _C()
    kernel_step([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)], lr=0.1, beta1=0.9,
                 beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False,
                 grad_scale=torch.tensor(1024.0))
    assert torch.equal(g_buf.t(), expected)


# ---- AMP: grad_scale and found_inf, against torch's fused Adam ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inf", [False, True])
def test_grad_scale_and_found_inf_match_torch_fused(dtype, inf):
    params0 = [torch.randn(n).to(dtype) for n in (1, 17, 300)]

    def run(make):
        params = [p.clone().requires_grad_() for p in params0]
        opt = make(params)
        gen = torch.Generator().manual_seed(0)
        grads = []
        for s in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 512).to(dtype)
            opt.grad_scale = torch.tensor(512.0)
            opt.found_inf = torch.tensor(1.0 if inf and s == 2 else 0.0)
            opt.step()
            grads.append([p.grad.clone() for p in params])
        return params, opt, grads

    kw = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    ours_p, ours, ours_g = run(lambda ps: FusedAdamW(ps, backend="cpu", **kw))
    ref_p, ref, ref_g = run(lambda ps: torch.optim.AdamW(ps, fused=True, **kw))
    for a, b in zip(ours_g, ref_g):  # the unscaled grad is written back (and not written on the skipped step)
        assert_bitwise(a, b)
    assert_close_to_reference(tensors_of(ours_p, ours), tensors_of(ref_p, ref))
    assert all(float(ours.state[p]["step"]) == (2.0 if inf else 3.0) for p in ours_p)


def test_found_inf_changes_nothing():
    p = torch.randn(100)
    tensors = [p, torch.randn(100), torch.randn(100), torch.rand(100), torch.rand(100)]
    before = [t.clone() for t in tensors]
    step = torch.tensor(5.0)
    kernel_step([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], [tensors[4]], [step], lr=0.1, beta1=0.9,
                    beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False, decoupled=True,
                    grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))
    assert_bitwise(tensors, before)
    assert float(step) == 5.0


# ---- per-tensor steps ---------------------------------------------------------------------------------------------


def test_each_tensor_uses_its_own_step():
    """Tensors at different step counts in one call: each gets its own bias corrections."""
    params0 = [torch.randn(33) for _ in range(3)]
    C = _C()

    def one(p, step0):
        ps, ms, vs = [p.clone()], [torch.full_like(p, 0.1)], [torch.full_like(p, 0.2)]
        kernel_step(ps, [torch.ones_like(p)], ms, vs, [], [torch.tensor(step0)], lr=0.1, beta1=0.9, beta2=0.99,
                     eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
        return ps[0]

    steps = [torch.tensor(s) for s in (0.0, 4.0, 99.0)]
    ps = [p.clone() for p in params0]
    kernel_step(ps, [torch.ones_like(p) for p in ps], [torch.full_like(p, 0.1) for p in ps],
                 [torch.full_like(p, 0.2) for p in ps], [], steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                 weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    assert [float(s) for s in steps] == [1.0, 5.0, 100.0]
    for p, p0, s0 in zip(ps, params0, (0.0, 4.0, 99.0)):
        assert torch.equal(p, one(p0, s0))


# ---- bad input ----------------------------------------------------------------------------------------------------


def _call(params, grads, ms=None, vs=None, maxs=(), steps=None, amsgrad=False):
    ms = ms if ms is not None else [torch.zeros_like(p) for p in params]
    vs = vs if vs is not None else [torch.zeros_like(p) for p in params]
    steps = steps if steps is not None else [torch.tensor(0.0) for _ in params]
    kernel_step(params, grads, ms, vs, list(maxs), steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                    weight_decay=0.0, amsgrad=amsgrad, maximize=False, decoupled=False)
    return steps


def test_bad_inputs_raise_clear_errors():
    ps = [torch.zeros(3), torch.zeros(2, 5)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[5, 2\], but params\[1\] has shape \[2, 5\]"):
        _call(ps, [torch.zeros(3), torch.zeros(5, 2)], steps=steps)
    assert [float(s) for s in steps] == [0.0, 0.0]  # nothing changed on error
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype Double, but params\[0\] has dtype Float"):
        _call(ps, [torch.zeros(3, dtype=torch.float64), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="grads has 1 tensors, expected 2"):
        _call(ps, [torch.zeros(3)])
    with pytest.raises(TypeError, match=r"params\[1\] has dtype Double, but params\[0\] has dtype Float"):
        _call([torch.zeros(3), torch.zeros(2, dtype=torch.float64)], [torch.zeros(3), torch.zeros(2)])
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has shape \[4\]"):
        _call(ps[:1], [torch.zeros(3)], vs=[torch.zeros(4)])
    with pytest.raises(ValueError, match="max_exp_avg_sqs has 0 tensors, expected 1"):
        _call(ps[:1], [torch.zeros(3)], amsgrad=True)
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must be a one-element float32"):
        _call(ps[:1], [torch.zeros(3)], steps=[torch.tensor(0, dtype=torch.int64)])
    with pytest.raises(TypeError, match="supports float32, float64, bfloat16 and float16"):
        _call([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has layout Sparse"):
        _call(ps[:1], [torch.zeros(3).to_sparse()])


def test_bad_tensor_among_thousands_is_the_first_one_named_and_nothing_changes():
    """With >= 2048 tensors the per-tensor checks run in both threads (NOTE [cpu per-tensor cost]): the error is
    still the first bad tensor's, and nothing is written."""
    n = 5000
    ps = [torch.zeros(2) for _ in range(n)]
    grads = [torch.ones(2) for _ in range(n)]
    grads[4500] = torch.ones(2, dtype=torch.float64)
    grads[2600] = torch.ones(3)
    grads[3900] = torch.ones(2).to_sparse()
    steps = [torch.tensor(0.0) for _ in range(n)]
    for threads in (2, 1):
        with num_threads(threads):
            with pytest.raises(RuntimeError, match=r"grads\[2600\] has shape \[3\], but params\[2600\] has shape \[2\]"):
                _call(ps, grads, steps=steps)
    assert all(float(s) == 0.0 for s in steps) and all(not p.any() for p in ps)
    grads[2600], grads[3900], grads[4500] = torch.ones(2), torch.ones(2), torch.ones(2)
    with num_threads(2):
        _call(ps, grads, steps=steps)
    assert all(float(s) == 1.0 for s in steps) and all(p.ne(0).all() for p in ps)


def test_grads_read_by_the_kernel_among_thousands():
    """Partition.step_(None): the per-tensor pass reads each param's .grad with its checks (NOTE [grads read in
    C++]), in both threads past 2048 tensors. A missing grad returns False and a bad one raises, naming it; either
    way nothing is written. The references the pass took are dropped after the step."""
    n = 5000
    ps = [torch.zeros(2) for _ in range(n)]
    ms, vs = [torch.zeros(2) for _ in range(n)], [torch.zeros(2) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    part = _C().Partition(ps, ms, vs, [], steps)
    hyper = Hyper(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    for i, p in enumerate(ps):
        p.grad = torch.ones(2) if i != 4000 else None
    for threads in (2, 1):
        with num_threads(threads):
            assert part.step_(None, hyper) is False
    ps[4000].grad = torch.ones(2)
    ps[2600].grad = torch.ones(2).to_sparse()
    for threads in (2, 1):
        with num_threads(threads):
            with pytest.raises(RuntimeError, match=r"grads\[2600\] has layout Sparse"):
                part.step_(None, hyper)
    assert all(float(s) == 0.0 for s in steps) and all(not p.any() for p in ps)
    ps[2600].grad = torch.ones(2)
    use_counts = [p.grad._use_count() for p in ps]  # the TensorImpls' reference counts
    with num_threads(2):
        assert part.step_(None, hyper) is True
    assert all(float(s) == 1.0 for s in steps) and all(p.ne(0).all() for p in ps)
    assert all(m.eq(0.1).all() for m in ms)  # (1 - 0.9) * grad: every grad was read
    assert [p.grad._use_count() for p in ps] == use_counts


def test_partition_step_runs_the_data_pass_without_the_gil():
    """NOTE [grads read in C++]: the grads are read holding the GIL, the data pass runs without it (with grads
    given, the whole call does), so a Python thread runs during a long step. A call holding the GIL throughout
    would let it run at most one switch interval (1 ms here) of a ~8 ms step, after the call returns."""
    n = 1 << 23
    p = torch.zeros(n)
    p.grad = torch.ones(n)
    part = _C().Partition([p], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(0.0)])
    hyper = Hyper(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    stamps, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-3)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.01)
        covered = {}
        with num_threads(1):
            for grads in (None, [p.grad], None, [p.grad], None, [p.grad]):
                start = time.perf_counter()
                assert part.step_(grads, hyper) is True
                end = time.perf_counter()
                inside = [t for t in stamps[-1_000_000:] if start < t < end]
                share = (inside[-1] - inside[0]) / (end - start) if len(inside) > 1 else 0.0
                covered.setdefault(grads is None, []).append(share)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    # The best of three steps per path: the scheduler may keep the thread off a core during one of them.
    assert all(max(shares) > 0.5 for shares in covered.values()), covered


def test_wrong_state_shape_through_the_optimizer():
    p = torch.zeros(4, requires_grad=True)
    opt = FusedAdam([p], backend="cpu")
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has shape \[5\], but params\[0\] has shape \[4\]"):
        opt.step()


# ---- property: random shapes, dtypes and hyperparameters against the reference ----------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3, 0.1]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    decoupled=st.booleans(),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_matches_reference(shapes, dtype, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                        decoupled, steps, seed):
    if dtype == torch.float16:
        eps = max(eps, 1e-3)  # as the parity table: smaller eps underflows in fp16 and both sides divide by ~0
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    kw = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
              decoupled_weight_decay=decoupled)
    ours_p = [p.clone().requires_grad_() for p in params0]
    ref_p = [p.clone().requires_grad_() for p in params0]
    ours, ref = FusedAdam(ours_p, backend="cpu", **kw), FusedAdam(ref_p, backend="reference", **kw)
    for _ in range(steps):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        # Each step from the same state. The cpu kernel is torch fused's arithmetic, the reference torch's
        # for-loop's; they differ in the last fp32 bit (AdamW's decay: p - lr*wd*p against p * (1 - lr*wd)), which
        # may flip one rounding to 16 bits. Carried over steps, that one ulp of a param of size ~1 is many ulps of
        # the same param once a later update brings it near 0, so each step starts from the reference's state.
        assert_close_to_reference(tensors_of(ours_p, ours), tensors_of(ref_p, ref), max_ulps=1)
        with torch.no_grad():
            for x, y in zip(tensors_of(ours_p, ours), tensors_of(ref_p, ref)):
                x.copy_(y)


def test_op_schema_runs_the_same_kernel():
    """torch.ops.fused_adam.adam_step_ (the dispatcher's way in) gives the bits of _C.Partition.step_."""
    schema = str(torch.ops.fused_adam.adam_step_.default._schema)
    assert "int wd_mode" in schema and "bool sr_param=False" in schema
    params0 = [torch.randn(n) for n in (1, 17, 1000)]

    def run(fn):
        ps = [p.clone() for p in params0]
        gs = [torch.full_like(p, 0.25) for p in ps]
        ms, vs, xs = ([torch.zeros_like(p) for p in ps] for _ in range(3))
        steps = [torch.tensor(0.0) for _ in ps]
        fn(ps, gs, ms, vs, xs, steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True,
           maximize=True, decoupled=True, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
        return ps + gs + ms + vs + xs + steps

    assert_bitwise(run(kernel_step), run(op_step))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_stores_round_like_torch(dtype):
    """One step from zero states: exp_avg = lerp(0, g, 1 - beta1) = 0.1f * g in fp32, rounded once on store. Bitwise
    torch's conversion for subnormals, ties, overflow to inf, infinities and signed zeros; a NaN stays a NaN."""
    info = torch.finfo(dtype)
    special = [0.0, -0.0, 1.0, -3.0, info.tiny, info.tiny / 4, -info.tiny / 8, info.max, -info.max, 2 * info.max,
               float("inf"), float("-inf"), 1e-40, 1 + 2**-8, 1 + 3 * 2**-9, 65519.0, 65520.0, 1e30]
    g32 = torch.cat([torch.tensor(special), torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    g = g32.to(dtype)
    m = torch.zeros_like(g)
    C = _C()
    kernel_step([torch.zeros_like(g)], [g.clone()], [m], [torch.zeros_like(g)], [], [torch.tensor(0.0)], lr=0.0,
                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    expected = torch.zeros_like(g32).lerp_(g.float(), 1 - 0.9).to(dtype)  # torch's fp32 lerp, then torch's rounding
    both_nan = m.isnan() & expected.isnan()
    assert torch.equal(m[~both_nan].view(torch.int16), expected[~both_nan].view(torch.int16))
    assert torch.equal(m.isnan(), expected.isnan())


@pytest.mark.parametrize("loop", ["parity", "clip", "sr"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_16bit_pairs_step_each_element_as_alone(dtype, loop):
    """NOTE [16-bit pairs] (csrc/cpu/kernel_impl.h): 16-bit arrays are stepped two elements per dword, an odd last
    element on its own. Every element, specials included (NaN, +-inf, denormals, -0), ends with the same bits
    whether it was stepped alone (one-element tensors), in a tensor of 201 (the last one unpaired), at an odd address
    (a view at element 1), or in a tensor of 202, in every mode of the loop. Stochastic rounding hashes each
    element's index in its tensor, so there the one-tensor layouts are compared with each other. (assert_same_bits:
    a NaN may come out as another NaN.)"""
    if loop == "sr" and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding rounds bf16 only")
    gen = torch.Generator().manual_seed(5)
    n = 201
    specials = torch.tensor(BF16_SPECIALS if dtype == torch.bfloat16 else
                            [float("nan"), float("inf"), float("-inf"), -0.0, 6e-8, -3e-5, 65504.0, 1.0, -2.5])

    def values(scale):
        x = torch.randn(n + 2, generator=gen) * scale
        pick = torch.randint(0, 4 * len(specials), (n + 2,), generator=gen)
        x[pick < len(specials)] = specials[pick[pick < len(specials)]]
        return x.to(dtype)

    arrays0 = [values(1.0), values(1e-2), values(1e-3), values(1e-5).abs(), values(1e-5).abs()]
    clip = dict(clip_coef=torch.tensor(0.75)) if loop == "clip" else {}

    def run(layout, amsgrad, maximize, unscale, wd):
        """The n elements 1..n of arrays0 after two steps, as int16, stepped in this layout."""
        if layout == "alone":
            full = [t.clone() for t in arrays0]
            lists = [[t[1 + i: 2 + i] for i in range(n)] for t in full]
        elif layout == "odd":  # a view at element 1 of its storage
            full = [t.clone() for t in arrays0]
            lists = [[t[1: n + 1]] for t in full]
        else:  # a tensor of its own from element 1: n elements, or n + 1
            full = [t[1: n + 1 + (layout == "longer")].clone() for t in arrays0]
            lists = [[t] for t in full]
        ps, gs, ms, vs, xs = lists
        sr = dict(stochastic_rounding=True, tensor_ids=list(range(len(ps))), seed=7) if loop == "sr" else {}
        for _ in range(2):
            kernel_step(ps, gs, ms, vs, xs if amsgrad else [], [torch.tensor(0.0) for _ in ps], lr=1e-2, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.0 if wd == "none" else 0.1, amsgrad=amsgrad,
                        maximize=maximize, decoupled=wd == "decoupled",
                        grad_scale=torch.tensor(0.5) if unscale else None, **clip, **sr)
        at = 0 if layout in ("own", "longer") else 1
        return [t[at: at + n] for t in full]

    for amsgrad, maximize, unscale, wd in itertools.product([False, True], [False, True], [False, True],
                                                          ["none", "l2", "decoupled"]):
        layouts = ["own", "odd", "longer"] if loop == "sr" else ["alone", "own", "odd", "longer"]
        want = run(layouts[0], amsgrad, maximize, unscale, wd)
        for layout in layouts[1:]:
            got = run(layout, amsgrad, maximize, unscale, wd)
            for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, want):
                assert_same_bits(a, b, (layout, amsgrad, maximize, unscale, wd, name))


# ---- the AVX512_BF16 loop (csrc/cpu/bf16_avx512.h) ---------------------------------------------------------------

# bf16 inputs that the vcvtne2ps2bf16 store would round differently without its exact fallback (NaN, denormals in
# and out), its neighbours (+-0, +-inf, the smallest normal, near-overflow), and ordinary values.
BF16_SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 5e-39, -9e-39, 1.2e-38,
                 -1.1754944e-38, 3.3e38, -3.3e38, 1.0, -2.5, 1e-3, 1e30, -1e-30]


# NaNs that no float converts to (torch's rounding makes every NaN 0x7FC0): signalling, payloads, negative. A
# signalling one passes through amsgrad's max unquieted, so the stores see it.
BF16_NAN_BITS = [0x7F81, 0x7FC5, -0x0001, -0x007F]  # 0x7F81, 0x7FC5, 0xFFFF, 0xFF81 as int16


def _bf16_with_specials(n: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """n ordinary bf16 values with about a quarter of them replaced by BF16_SPECIALS or BF16_NAN_BITS, at random
    places."""
    x = torch.randn(n, generator=gen) * scale
    pick = torch.randint(0, 4 * len(BF16_SPECIALS), (n,), generator=gen)
    special = pick < len(BF16_SPECIALS)
    x[special] = torch.tensor(BF16_SPECIALS)[pick[special]]
    out = x.to(torch.bfloat16)
    raw = torch.randint(0, 8 * len(BF16_NAN_BITS), (n,), generator=gen)
    nan_bits = raw < len(BF16_NAN_BITS)
    out.view(torch.int16)[nan_bits] = torch.tensor(BF16_NAN_BITS, dtype=torch.int16)[raw[nan_bits]]
    return out


def test_bf16_store_exhaustive():
    """The AVX512_BF16 loop's store (vcvtne2ps2bf16, and the exact integer rounding for blocks with a NaN or a
    denormal) against the scalar rounding (Storage<kBFloat16>::store, c10's round_to_nearest_even) for all 2^32
    float bit patterns (~6 s)."""
    if "avx512bf16" not in supported_isas():
        pytest.skip("this CPU has no AVX512_BF16")
    assert _C().cpu_bf16_store_mismatches(0, 2**32) == 0


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush_denormal"])
@pytest.mark.parametrize("wd", ["none", "l2", "decoupled"])
@pytest.mark.parametrize("loop", ["parity", "clip", "sr", "sr_clip"])
def test_bf16_specials_same_bits_on_every_isa(loop, wd, flush_denormal):
    """bf16 params, grads and states holding NaN, +-inf, denormals, -0 and ordinary values, sizes 1..67, 1000 and
    4097 (vector tails and full vectors; 70001 with stochastic rounding, whose hash takes the index's high half),
    every mode of the torch-parity loop and of the feature loop's bf16/bf16 kinds (clip, stochastic rounding): the
    hand-written AVX512_BF16 loops and the AVX-512 build give the bits of the AVX2 build (or baseline), compared as
    int16 (assert_same_bits: a NaN may come out as another NaN where stochastic rounding keeps its payload). Also
    with torch.set_flush_denormal(True), under which vfpclassps no longer sees denormals."""
    isas = [isa for isa in ("avx512bf16", "avx512", "avx2", "baseline") if isa in supported_isas()]
    reference = "avx2" if "avx2" in isas else "baseline"
    gen = torch.Generator().manual_seed(3)
    sizes = list(range(1, 68)) + [1000, 4097] + ([70001] if loop.startswith("sr") else [])
    p0 = [_bf16_with_specials(n, gen, 1.0) for n in sizes]
    g0 = [_bf16_with_specials(n, gen, 1e-2) for n in sizes]
    m0 = [_bf16_with_specials(n, gen, 1e-3) for n in sizes]
    # Negative second moments too: under DAZ a denormal max_exp_avg_sq passes through amsgrad's max unchanged only
    # where the new exp_avg_sq is below zero.
    v0 = [_bf16_with_specials(n, gen, 1e-5) for n in sizes]
    x0 = [_bf16_with_specials(n, gen, 1e-5) for n in sizes]
    extra = {}
    if loop.startswith("sr"):
        extra.update(stochastic_rounding=True, tensor_ids=list(range(len(sizes))), seed=12345)
    if loop.endswith("clip"):
        extra.update(clip_coef=torch.tensor(0.75))

    def run(isa, amsgrad, maximize, unscale, beta1):
        ps, gs, ms, vs = ([t.clone() for t in ts] for ts in (p0, g0, m0, v0))
        xs = [t.clone() for t in x0] if amsgrad else []
        steps = [torch.tensor(0.0) for _ in sizes]
        with cpu_isa(isa), num_threads(1):
            for _ in range(2):
                kernel_step(ps, gs, ms, vs, xs, steps, lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8,
                                weight_decay=0.0 if wd == "none" else 0.1, amsgrad=amsgrad, maximize=maximize,
                                decoupled=wd == "decoupled", grad_scale=torch.tensor(0.5) if unscale else None,
                                **extra)
        return ps + gs + ms + vs + xs

    if not torch.set_flush_denormal(flush_denormal) and flush_denormal:
        pytest.skip("this CPU cannot flush denormals")
    try:
        for amsgrad, maximize, unscale, beta1 in itertools.product([False, True], [False, True], [False, True],
                                                                   [0.9, 0.2]):  # 1 - 0.2 >= 0.5: lerp's other form
            want = run(reference, amsgrad, maximize, unscale, beta1)
            for isa in isas:
                got = run(isa, amsgrad, maximize, unscale, beta1)
                for i, (a, b) in enumerate(zip(got, want)):
                    assert_same_bits(a, b, (isa, amsgrad, maximize, unscale, beta1, i))
    finally:
        torch.set_flush_denormal(False)
