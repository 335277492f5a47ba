"""The CUDA backend (csrc/cuda, fused_adam._C_cuda) on a GPU: parity with torch.optim.Adam/AdamW over the option
table, agreement with the reference (and triton, cpu) backends on the sizes that find bugs, one launch a step over
the device table (10,000 tensors, moved grads), CUDA-graph capture, AMP. Without CUDA these skip with the reason;
the backend's availability is checked everywhere. The same kernel runs on the CPU in tests/test_cuda_build.py (host
emulation), which needs no GPU.
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from types import SimpleNamespace

from fused_adam import FusedAdam, FusedAdamW, backends
from fused_adam.backends import Hyper, PartOptions
from parity import (DTYPES, FEATURE_CASES, K_LOW_PRECISION, LOW_PRECISION, OPTIM_INPUTS, _adjust, bits, feature_id,
                    make_grads, make_params)

_REASON = backends.unavailable("cuda")
requires_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available() or _REASON is not None,
    reason="no CUDA device" if not torch.cuda.is_available() else f"cuda backend unavailable: {_REASON}",
)
DEVICE = "cuda"
CHUNK = 65536  # kDefaultChunkSize


def _part(device, dtype, **group):
    """What supports() reads of a partition: its device and its options (PartOptions.of, the one place)."""
    group = {"lr": 1e-3, "weight_decay": 0.0, "decoupled_weight_decay": False, "amsgrad": False, "maximize": False,
             "capturable": False, "differentiable": False, **group}
    return SimpleNamespace(device=torch.device(device), options=PartOptions.of(group, dtype, clip=False))


# ---- everywhere --------------------------------------------------------------------------------------------------

def test_unavailable_says_why():
    reason = backends.unavailable("cuda")
    if torch.version.cuda is None:
        assert reason is not None and "without CUDA" in reason
    elif reason is not None:
        assert "_C_cuda" in reason  # the extension's import error


def test_explicit_backend_raises_with_the_reason():
    if backends.unavailable("cuda") is None:
        pytest.skip("the cuda backend is available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        FusedAdam([torch.zeros(3, requires_grad=True)], backend="cuda")


@requires_cuda_backend
def test_supports_declines_cpu_differentiable_and_what_is_not_compiled():
    backend = backends.get("cuda")
    assert "CUDA devices only" in backend.supports(_part("cpu", torch.float32))
    assert "differentiable" in backend.supports(_part("cuda:0", torch.float32, differentiable=True))
    assert backend.supports(_part("cuda:0", torch.float32)) is None
    assert "not supported" in backend.supports(_part("cuda:0", torch.int32))
    compiled = ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32))
    for dtype, state_dtype in compiled:
        assert backend.supports(_part("cuda:0", dtype, state_dtype=state_dtype)) is None
    for dtype, state_dtype in ((torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float64, torch.float32)):
        reason = backend.supports(_part("cuda:0", dtype, state_dtype=state_dtype))
        assert reason is not None and "no kernel for" in reason, (dtype, state_dtype, reason)


# ---- on a GPU ----------------------------------------------------------------------------------------------------

def _run(opt_cls, kwargs, params0, steps, dtype=None, grad_seed=0, make=None, **extra):
    """Train params0 (moved to the GPU) for `steps` steps on make_grads' grads; return (params, optimizer).
    `make()` builds the params instead (views, odd layouts)."""
    params = make() if make else [p.detach().clone().to(device=DEVICE, dtype=dtype or p.dtype) for p in params0]
    params = [p.requires_grad_() for p in params]
    opt = opt_cls(params, **kwargs, **extra)
    for s in range(steps):
        for p, g in zip(params, make_grads(params0, s, grad_seed)):
            p.grad = g.to(device=DEVICE, dtype=p.dtype)
        opt.step()
    return params, opt


def _state(opt, p, name):
    return p.detach() if name == "param" else opt.state[p][name]


def assert_parity_cuda(cls_name, kwargs, dtype, steps=20, shapes=None):
    """tests/parity.py's assert_parity with the params on the GPU; torch's for-loop path on the GPU is the oracle."""
    kwargs = _adjust(kwargs, dtype)
    if cls_name == "AdamW":
        kwargs.pop("decoupled_weight_decay", None)
    ours_cls = FusedAdamW if cls_name == "AdamW" else FusedAdam
    torch_cls = torch.optim.AdamW if cls_name == "AdamW" else torch.optim.Adam
    params0 = make_params(dtype, shapes) if shapes else make_params(dtype)
    ours_p, ours = _run(ours_cls, kwargs, params0, steps, backend="cuda")
    ref_p, ref = _run(torch_cls, kwargs, params0, steps, foreach=False)
    assert all(d.backend == "cuda" for d in ours.dispatch[0]), ours.dispatch
    names = ["param"] + [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in ref.state[ref_p[0]]]
    if dtype not in LOW_PRECISION:
        for i in range(len(params0)):
            for name in names:
                torch.testing.assert_close(_state(ours, ours_p[i], name), _state(ref, ref_p[i], name),
                                           msg=lambda m: f"{name} of param {i}: {m}")
            assert float(ours.state[ours_p[i]]["step"]) == float(ref.state[ref_p[i]]["step"]) == steps
        return
    wide_p, wide = _run(torch_cls, kwargs, [p.double() for p in params0], steps, dtype=torch.float64, foreach=False)
    for i in range(len(params0)):
        if params0[i].numel() == 0:
            continue
        for name in names:
            exact = _state(wide, wide_p[i], name)
            ours_err = (_state(ours, ours_p[i], name).double() - exact).abs().max().item()
            torch_err = (_state(ref, ref_p[i], name).double() - exact).abs().max().item()
            floor = torch.finfo(dtype).eps / 2 * exact.abs().max().item()
            assert ours_err <= K_LOW_PRECISION * torch_err + floor, (
                f"{name} of param {i}: error vs fp64 {ours_err:.3g} > {K_LOW_PRECISION} x torch's {torch_err:.3g} + {floor:.3g}"
            )


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_parity_with_torch(optim_input, dtype, cls_name):
    assert_parity_cuda(cls_name, optim_input.kwargs, dtype)


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_capturable(dtype, capturable):
    assert_parity_cuda("AdamW", {"weight_decay": 0.1, "amsgrad": True, "capturable": capturable}, dtype)


# Sizes that find bugs: 1, odd, empty, chunk boundaries +-1, a 16-byte vector +-1, more tensors than one launch
# (32) and more chunks than one launch (320).
BUG_SHAPES = [(1,), (3,), (7,), (8,), (9,), (0,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2, CHUNK + 3), (67, 3)]
MANY_SHAPES = BUG_SHAPES + [(n,) for n in range(1, 40)] + [(CHUNK * 321 + 5,)]


def _compare_backends(dtype, shapes, kwargs, other="reference", steps=3, make=None, other_device=DEVICE):
    params0 = make_params(dtype, shapes)
    ours_p, ours = _run(FusedAdam, kwargs, params0, steps, backend="cuda", make=make)
    if other_device == DEVICE:
        ref_p, ref = _run(FusedAdam, kwargs, params0, steps, backend=other, make=make)
    else:  # the cpu backend: same math header, CPU tensors
        ref_p = [p.detach().clone().requires_grad_() for p in params0]
        ref = FusedAdam(ref_p, backend=other, **kwargs)
        for s in range(steps):
            for p, g in zip(ref_p, make_grads(params0, s)):
                p.grad = g
            ref.step()
    tol = {} if dtype not in LOW_PRECISION else dict(atol=2 * torch.finfo(dtype).eps, rtol=2 * torch.finfo(dtype).eps)
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), **tol, msg=lambda m: f"param {i}: {m}")
        for k, v in ref.state[b].items():
            torch.testing.assert_close(ours.state[a][k].cpu(), v.cpu(), **tol, msg=lambda m: f"{k} of param {i}: {m}")


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "amsgrad": True, "maximize": True},
                                    {"weight_decay": 0.1, "decoupled_weight_decay": True}], ids=["default", "ams-max", "adamw"])
def test_matches_reference_many_tensors_and_launches(dtype, kwargs):
    _compare_backends(dtype, MANY_SHAPES, kwargs)


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_and_odd_layouts(dtype):
    """Views at odd offsets (scalar path beside vector launches), transposed (dense) params, non-dense params."""
    base0, extra0 = make_params(dtype, [(CHUNK * 3,), (33, 17)])

    def make():
        base = base0.to(DEVICE)  # a fresh copy per run; the params are disjoint views into it
        return [base[1:CHUNK + 2], base[CHUNK + 8: 2 * CHUNK + 8], base[2 * CHUNK + 16: 2 * CHUNK + 616].view(20, 30).t(),
                base[2 * CHUNK + 624: 2 * CHUNK + 1624].view(10, 100)[:, ::3], extra0.to(DEVICE)]

    # Overlapping params would make the result depend on the order of their updates (torch's for-loop updates
    # one after the other; one launch does not): the views must not share an element.
    spans = sorted((v.storage_offset(), v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride())))
                   for v in make()[:4])
    assert all(end < start for (_, end), (start, _) in zip(spans, spans[1:])), spans
    params0 = [p.cpu() for p in make()]
    kwargs = {"weight_decay": 0.1, "amsgrad": True}
    ours_p, ours = _run(FusedAdam, kwargs, params0, 3, backend="cuda", make=make)
    ref_p, ref = _run(FusedAdam, kwargs, params0, 3, backend="reference", make=make)
    assert ours_p[0].storage_offset() == 1 and not ours_p[3].is_contiguous()
    tol = {} if dtype not in LOW_PRECISION else dict(atol=2 * torch.finfo(dtype).eps, rtol=2 * torch.finfo(dtype).eps)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)


@requires_cuda
@requires_cuda_backend
def test_grads_with_other_strides():
    """A param and its grad with different strides (torch 2.13's fused CPU path gets this wrong)."""
    params = [torch.randn(30, 20, device=DEVICE).t().requires_grad_(), torch.randn(64, 64, device=DEVICE).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt, ref_opt = FusedAdam(params, backend="cuda", amsgrad=True), torch.optim.Adam(ref, amsgrad=True, foreach=False)
    for s in range(3):
        for p, r in zip(params, ref):
            g = torch.randn(p.shape, device=DEVICE)
            p.grad = g.t().contiguous().t() if p.is_contiguous() else g.contiguous()
            r.grad = g.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], ref_opt.state[r][k])


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("other", ["triton", "cpu"])
def test_agrees_with_other_kernels(other):
    if backends.unavailable(other) is not None:
        pytest.skip(f"{other} backend unavailable: {backends.unavailable(other)}")
    kwargs = {"weight_decay": 0.1, "amsgrad": True}
    _compare_backends(torch.float32, BUG_SHAPES, kwargs, other=other, other_device=DEVICE if other == "triton" else "cpu")


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("grads_in_graph", [False, True], ids=["static-grads", "grads-made-in-capture"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_matches_eager(dtype, grads_in_graph):
    """capturable=True: step() captured once and replayed matches eager steps, with a device lr changed between
    replays (as an LR scheduler writing into a Tensor lr does). grads-made-in-capture: torch's whole-network recipe
    (zero_grad(set_to_none=True) before capture, backward inside it) makes the grads in the graph's pool, at new
    addresses: the device table's patch is a node of the graph."""
    params0 = make_params(dtype, BUG_SHAPES[:9] + [(33, 5)] * 40)
    grads = [[g.to(DEVICE, dtype) for g in make_grads(params0, s)] for s in range(6)]
    lrs = [1e-3, 1e-3, 5e-4, 5e-4, 2e-4, 1e-4]

    def fresh():
        params = [p.detach().clone().to(DEVICE).requires_grad_() for p in params0]
        lr = torch.tensor(lrs[0], device=DEVICE)
        return params, lr, FusedAdamW(params, lr=lr, capturable=True, amsgrad=True, backend="cuda")

    eager_p, eager_lr, eager = fresh()
    for s in range(6):
        eager_lr.fill_(lrs[s])
        for p, g in zip(eager_p, grads[s]):
            p.grad = g.clone()
        eager.step()

    params, lr, opt = fresh()
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    # Warm up on a side stream (lazy state, plan building), as torch's capture recipe does: that is step 1.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(static_grads, grads[0]):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if grads_in_graph:
        opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        if grads_in_graph:
            for p, g in zip(params, static_grads):
                p.grad = g * 1.0
        opt.step()
    for s in range(1, 6):
        lr.fill_(lrs[s])
        for g, new in zip(static_grads, grads[s]):
            g.copy_(new)
        graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(params, eager_p)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"param {i}: {m}")
        for k, v in eager.state[b].items():
            torch.testing.assert_close(opt.state[a][k], v, rtol=0, atol=0, msg=lambda m: f"{k} of param {i}: {m}")


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("capturable", [False, True])
def test_amp_grad_scaler(capturable):
    """GradScaler hands grad_scale/found_inf to the kernel: grads unscaled in place; an inf skips everything."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).to(DEVICE)
    ref_model = __import__("copy").deepcopy(model)
    opt = FusedAdam(model.parameters(), backend="cuda", capturable=capturable, weight_decay=0.1)
    ref_opt = FusedAdam(ref_model.parameters(), backend="reference", capturable=capturable, weight_decay=0.1)
    scaler, ref_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10), torch.amp.GradScaler("cuda", init_scale=2.0**10)
    for s in range(4):
        x = torch.randn(16, 37, device=DEVICE)
        if s == 2:
            x[0, 0] = float("inf")  # found_inf: this step changes nothing
        for m, o, sc in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            sc.step(o)
            sc.update()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(p.grad, r.grad)
        assert float(opt.state[p]["step"]) == float(ref_opt.state[r]["step"]) == 3


@requires_cuda
@requires_cuda_backend
def test_binding_errors_name_the_argument():
    from fused_adam import _C_cuda

    p = [torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE)]
    g = [torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE)]
    m = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    v = [torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE)]
    steps = [torch.zeros(()), torch.zeros(())]
    hyper = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    group = dict(lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                 capturable=False, differentiable=False)

    def part(m, steps):
        return _C_cuda.Partition(p, m, v, [], steps, options=PartOptions.of(group, torch.float32, clip=False))

    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape \[6\], but params\[1\] has shape \[5\]"):
        part(m, steps).step_(g, hyper)
    m[1] = torch.zeros(5, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"exp_avgs\[1\] has dtype Double, but exp_avgs\[0\] has dtype Float"):
        part(m, steps).step_(g, hyper)
    m[1] = torch.zeros(5, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must be a one-element float32 tensor on cpu"):
        part(m, [steps[0].to(DEVICE), steps[1]]).step_(g, hyper)
    assert float(steps[0]) == 0.0  # nothing changed on a refused call
    with pytest.raises(RuntimeError, match="no kernel for float32 params with float16 states"):
        part([t.half() for t in m], steps)
    ok = part(m, steps)
    assert ok.step_(None, hyper) is False  # grads read from the params: none yet
    assert ok.step_(g, hyper) is True and float(steps[0]) == 1.0


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "static-grads"])
def test_ten_thousand_tensors_one_launch(set_to_none):
    """10,000 tensors of 1,000 elements (and a few empty or large ones): one launch a step, grads that move between
    steps patched into the device table; against torch's for-loop."""
    shapes = [(1000,)] * 10_000 + [(0,), (CHUNK * 3 + 7,), (5, 3)]
    params0 = make_params(torch.float32, shapes)
    params = [p.to(DEVICE).requires_grad_() for p in params0]
    ref = [p.to(DEVICE).requires_grad_() for p in params0]
    opt = FusedAdamW(params, backend="cuda", weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, weight_decay=0.1, foreach=False)
    for s in range(3):
        grads = [g.to(DEVICE) for g in make_grads(params0, s)]
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=set_to_none)
        for p, r, g in zip(params, ref, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            r.grad = g
        opt.step()
        ref_opt.step()
    assert opt.dispatch[0][0].backend == "cuda"
    for i in (0, 4999, 9999, 10_001, 10_002):
        torch.testing.assert_close(params[i], ref[i], msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(opt.state[params[i]]["exp_avg_sq"], ref_opt.state[ref[i]]["exp_avg_sq"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if "adam_step_kernel" in e.name]
    assert len(launches) == 1, [e.name for e in prof.events()][:20]


@requires_cuda
@requires_cuda_backend
@pytest.mark.slow
def test_tensor_over_2_31_elements():
    """64-bit offsets: a 2^31 + 5 element bf16 param (4 GiB per buffer, ~17 GiB in all). Elements are independent,
    so the head and the tail are checked against the reference backend on copies of those slices."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs ~20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    p = torch.randn(n, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    p.grad = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    ends = [slice(0, 4096), slice(n - 70_000, n)]
    ref = [p.detach()[s].clone().requires_grad_() for s in ends]
    for r, s in zip(ref, ends):
        r.grad = p.grad[s].clone()
    opt, ref_opt = FusedAdam([p], backend="cuda", weight_decay=0.1), FusedAdam(ref, backend="reference", weight_decay=0.1)
    opt.step()
    ref_opt.step()
    tol = dict(atol=2 * torch.finfo(torch.bfloat16).eps, rtol=2 * torch.finfo(torch.bfloat16).eps)
    for r, s in zip(ref, ends):
        torch.testing.assert_close(p.detach()[s], r.detach(), **tol)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"][s], ref_opt.state[r]["exp_avg_sq"], **tol)


# ---- the options beyond torch, on a GPU ------------------------------------------------------------------------------

@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("capturable", [False, True], ids=["host-scalars", "capturable"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_features_match_reference(case, capturable):
    """Every compiled layout against the reference backend on the same GPU tensors: chunk boundaries, a misaligned
    view (scalar path), more tensors than a launch holds; clipping and AdamW on. 16-bit stores mostly bitwise (the
    check of the stochastic-rounding bits), everything within an ulp of the param's dtype (see test_cuda_build.py's
    _assert_features_match for why the param's)."""
    dtype, kw = case
    base0, *whole0 = make_params(dtype, [(2 * CHUNK + 64,)] + BUG_SHAPES + [(5,)] * 30)

    def make():
        base = base0.to(DEVICE)
        return [base[1:CHUNK + 2]] + [w.to(DEVICE) for w in whole0]

    params0 = [p.cpu() for p in make()]
    kwargs = {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "seed": 5, "capturable": capturable,
              "max_grad_norm": 0.5, **kw}
    ours_p, ours = _run(FusedAdam, kwargs, params0, 3, backend="cuda", make=make)
    ref_p, ref = _run(FusedAdam, kwargs, params0, 3, backend="reference", make=make)
    assert {d.backend for d in ours.dispatch[0]} == {"cuda"}
    same = total = 0
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        pairs = [("param", a.detach(), b.detach())] + [
            (k, ours.state[a][k], v) for k, v in ref.state[b].items() if torch.is_tensor(v) and k != "step"]
        for name, x, y in pairs:
            # An ulp of the narrowest stored dtype: a 16-bit store that rounded to the other neighbour once is read by
            # the next steps (and a 16-bit grad times clip_coef is rounded by the reference, not by adam_math.h).
            ulp = max(torch.finfo(t).eps for t in (dtype, x.dtype, kw.get("state_dtype", dtype)))
            torch.testing.assert_close(x, y, atol=ulp, rtol=ulp, msg=lambda m: f"{name} of param {i}: {m}")
            if x.element_size() == 2 and dtype == torch.float32:  # (16-bit grads: clipping rounds differently)
                same, total = same + (bits(x) == bits(y)).sum().item(), total + x.numel()
    assert same >= 0.95 * total, f"{same} of {total} 16-bit stores bitwise the reference's"


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("capturable", [False, True], ids=["host-salt", "device-salt"])
def test_stochastic_rounding_is_the_references_rounding(capturable):
    """Bitwise: one step from zero states of fp32 params with bf16 states stores SR((1 - beta1) * g) and
    SR((1 - beta2) * g * g) with the reference's bits, on the vector path, its tail and across chunks."""
    from fused_adam.backends.reference import bf16_stochastic, sr_salt

    shapes = [(1,), (300,), (5, 13), (CHUNK + 9,)]
    params = [p.to(DEVICE).requires_grad_() for p in make_params(torch.float32, shapes)]
    opt = FusedAdam(params, betas=(0.8, 0.95), state_dtype=torch.bfloat16, stochastic_rounding=True, seed=2**63 + 5,
                    capturable=capturable, backend="cuda")
    grads = [g.to(DEVICE) * 100 for g in make_grads(params, 0)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    w1, w2 = (torch.tensor(1 - b, dtype=torch.float64).float().to(DEVICE) for b in (0.8, 0.95))
    for tid, (p, g) in enumerate(zip(params, grads)):
        assert torch.equal(bits(opt.state[p]["exp_avg"]), bits(bf16_stochastic(w1 * g, sr_salt(2**63 + 5, 1, tid, 1))))
        assert torch.equal(bits(opt.state[p]["exp_avg_sq"]), bits(bf16_stochastic((w2 * g) * g, sr_salt(2**63 + 5, 1, tid, 2))))


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("dtype, kw", [(torch.bfloat16, dict(master_weights=True, stochastic_rounding=True)),
                                       (torch.bfloat16, dict(stochastic_rounding=True)),
                                       (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True))],
                         ids=["master-sr", "sr", "fp32-bf16-states-sr"])
def test_features_capture_in_a_cuda_graph(dtype, kw):
    """capturable + stochastic rounding (salts from the device step) + clipping (coefficient read on the device):
    a captured step replayed equals eager steps bit for bit; nothing syncs with the host during capture."""
    params0 = make_params(dtype, BUG_SHAPES[:9] + [(33, 5)] * 40)
    grads = [[g.to(DEVICE, dtype) for g in make_grads(params0, s)] for s in range(5)]

    def fresh():
        params = [p.detach().clone().to(DEVICE).requires_grad_() for p in params0]
        return params, FusedAdamW(params, lr=1e-3, capturable=True, max_grad_norm=1.0, seed=9, backend="cuda", **kw)

    eager_p, eager = fresh()
    for s in range(5):
        for p, g in zip(eager_p, grads[s]):
            p.grad = g.clone()
        eager.step()
    params, opt = fresh()
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(static_grads, grads[0]):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(1, 5):
        for g, new in zip(static_grads, grads[s]):
            g.copy_(new)
        graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(params, eager_p)):
        assert torch.equal(bits(a.detach()), bits(b.detach())), f"param {i}"
        for k, v in eager.state[b].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.equal(bits(opt.state[a][k]), bits(v)), f"{k} of param {i}"


@requires_cuda
@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_match_fp32_adam_on_the_master(dtype):
    """tests/test_beyond_torch.py's composition on the GPU: the master is torch's fp32 AdamW, the param its rounding."""
    params = make_params(dtype, BUG_SHAPES)
    ours_p = [p.to(DEVICE).requires_grad_() for p in params]
    ref_p = [p.float().to(DEVICE).requires_grad_() for p in params]
    ours = FusedAdamW(ours_p, lr=0.01, master_weights=True, state_dtype=torch.float32, backend="cuda")
    ref = torch.optim.AdamW(ref_p, lr=0.01, foreach=False)
    for s in range(5):
        for a, b, g in zip(ours_p, ref_p, make_grads(params, s)):
            a.grad, b.grad = g.to(DEVICE), g.float().to(DEVICE)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        master = ours.state[a]["master_param"]
        torch.testing.assert_close(master, b.detach())
        assert torch.equal(a.detach(), master.to(dtype))
