"""The Triton backend: parity with torch on CPU tensors under the Triton interpreter, and on CUDA when there is one.

The interpreter tests need TRITON_INTERPRET=1 before triton is first imported, and that must not leak into the
other test modules of a pytest process (test_triton_ptx.py compiles for real). So scripts/test.sh runs this
file in its own pytest process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_triton_backend.py   (interpreter tests)
    .venv/bin/python -m pytest -q tests/test_triton_backend.py                      (CUDA tests, on a GPU machine)
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from conftest import requires_cuda, requires_triton, requires_triton_interpreter
from fused_adam import FusedAdam, FusedAdamW
from parity import OPTIM_INPUTS, assert_parity

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ADAM_CLASSES = {"Adam": (FusedAdam, torch.optim.Adam), "AdamW": (FusedAdamW, torch.optim.AdamW)}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tb():
    from fused_adam.backends import triton as tb

    return tb


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements in tiles of 16, so that small tensors cross chunk and tile boundaries."""
    tb = _tb()
    monkeypatch.setattr(tb, "INTERPRET_CHUNK", 64)
    monkeypatch.setattr(tb, "INTERPRET_BLOCK", 16)
    return tb


# ---- interpreter: parity ---------------------------------------------------------------------------------------


@requires_triton_interpreter
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_triton_matches_torch(optim_input, dtype, cls_name):
    assert_parity("triton", cls_name, optim_input.kwargs, dtype)


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_chunk_and_tile_boundaries(small_chunks, dtype):
    # chunk 64, tile 16: sizes at tile and chunk boundaries +-1, several chunks, 1, empty.
    shapes = ((1,), (15,), (16,), (17,), (63,), (64,), (65,), (128,), (129,), (0,), (5, 13))
    # 20 steps: the harness's low-precision bound is too tight for 3 (the reference backend fails it there too).
    assert_parity("triton", "AdamW", {"weight_decay": 0.1, "amsgrad": True}, dtype, shapes=shapes)


@requires_triton_interpreter
def test_many_tensors_one_launch(small_chunks, monkeypatch):
    """300 tensors, ~500 chunks, one table: every chunk finds its own tensor."""
    monkeypatch.setattr(small_chunks, "INTERPRET_BLOCK", 64)  # one tile per chunk: the table is what is tested
    shapes = tuple((1 + (7 * i) % 150,) for i in range(300))
    assert_parity("triton", "Adam", {"weight_decay": 0.1}, torch.float32, steps=2, shapes=shapes)
    ps = [torch.randn(s).requires_grad_() for s in shapes]
    opt = FusedAdam(ps, backend="triton")
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    entry = small_chunks._cache[id(opt._plans[0].parts[0].state_steps[0])]
    assert len(entry.launches) == 1 and entry.launches[0].n_chunks == sum(-(-s[0] // 64) for s in shapes)
    del opt, ps, entry
    gc.collect()
    assert not small_chunks._cache  # entries die with their optimizer's state


@requires_triton_interpreter
@pytest.mark.parametrize("capturable", [False, True])
def test_per_tensor_steps(capturable):
    """Params that skipped steps (no grad) have their own step counts and bias corrections in one launch."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(n, generator=g) for n in (5, 9, 3)]
    grads = [[torch.randn(n.shape, generator=g) for n in init] for _ in range(6)]
    results = []
    for cls, kw in ((FusedAdam, dict(backend="triton", capturable=capturable)), (torch.optim.Adam, dict(foreach=False))):
        ps = [p.clone().requires_grad_() for p in init]
        opt = cls(ps, lr=0.01, **kw)
        for s in range(6):
            for i, p in enumerate(ps):
                p.grad = grads[s][i].clone() if (s >= 3 or i == 0) else None  # param 0 steps 6 times, others 3
            opt.step()
        results.append((ps, opt))
    (ours, o), (ref, r) = results
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o.state[a][k], r.state[b][k])
        assert float(o.state[a]["step"]) == float(r.state[b]["step"])
    assert [float(o.state[p]["step"]) for p in ours] == [6.0, 3.0, 3.0]


# ---- interpreter: capturable -----------------------------------------------------------------------------------


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_decay": 0.1, "amsgrad": True},
        {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.8), torch.tensor(0.95)), "weight_decay": 0.1},
    ],
    ids=["floats", "tensor lr and betas"],
)
def test_capturable_matches_eager(kwargs, dtype):
    """capturable=True: the step tensors live with the params and the kernel increments them; the result
    equals the host-scalar path within the dtype's tolerance."""
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in (1, 33, 200)]
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in init] for _ in range(8)]
    out = []
    for capturable in (True, False):
        ps = [p.clone().requires_grad_() for p in init]
        opt = FusedAdamW(ps, backend="triton", capturable=capturable, **kwargs)
        for s in range(8):
            for p, gr in zip(ps, grads[s]):
                p.grad = gr.clone()
            opt.step()
        out.append((ps, opt))
    (cap, oc), (eager, oe) = out
    for a, b in zip(cap, eager):
        assert oc.state[a]["step"].device == a.device and float(oc.state[a]["step"]) == 8.0
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(oc.state[a]["exp_avg"], oe.state[b]["exp_avg"])
        torch.testing.assert_close(oc.state[a]["exp_avg_sq"], oe.state[b]["exp_avg_sq"])


# ---- interpreter: AMP ------------------------------------------------------------------------------------------


def _amp_run(capturable: bool, scale: float, found: float, steps: int = 3, backend: str = "triton"):
    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(n, generator=g).requires_grad_() for n in (4, 70)]
    opt = FusedAdam(ps, lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend, capturable=capturable)
    grads = []
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for p, gr in zip(ps, grads):
            p.grad = gr * scale
        opt.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(found))
    return ps, opt, grads


@requires_triton_interpreter
@pytest.mark.parametrize("capturable", [False, True])
def test_grad_scale_unscales_in_place(capturable):
    ours, o, grads = _amp_run(capturable, 1024.0, 0.0)
    ref, r, _ = _amp_run(False, 1024.0, 0.0, backend="reference")
    for a, b, gr in zip(ours, ref, grads):
        torch.testing.assert_close(a.grad, gr)  # the stored grad is the unscaled one
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(o.state[a]["max_exp_avg_sq"], r.state[b]["max_exp_avg_sq"])
        assert float(o.state[a]["step"]) == 3.0


@requires_triton_interpreter
@pytest.mark.parametrize("capturable", [False, True])
def test_found_inf_changes_nothing(capturable):
    g = torch.Generator().manual_seed(4)
    ps = [torch.randn(n, generator=g).requires_grad_() for n in (4, 70)]
    opt = FusedAdam(ps, lr=0.01, amsgrad=True, backend="triton", capturable=capturable)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 8.0
    grads = [p.grad.clone() for p in ps]
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for p, (p0, s0), gr in zip(ps, before, grads):
        torch.testing.assert_close(p.detach(), p0, atol=0, rtol=0)
        torch.testing.assert_close(p.grad, gr, atol=0, rtol=0)
        for k, v in s0.items():
            torch.testing.assert_close(opt.state[p][k], v, atol=0, rtol=0, msg=k)


# ---- interpreter: layouts, cache, declines -----------------------------------------------------------------------


@requires_triton_interpreter
def test_any_strides(small_chunks):
    """A transposed param with contiguous grads, a non-dense view param, a misaligned view param: each is
    right (torch's for-loop path is the oracle; torch 2.13's fused CPU path is wrong for the first)."""
    g = torch.Generator().manual_seed(5)

    def params():
        g.manual_seed(5)
        return [
            torch.randn(6, 40, generator=g).t().detach().requires_grad_(),  # dense, transposed
            torch.randn(8, 24, generator=g)[:, ::2].detach().requires_grad_(),  # not dense: scratch copies
            torch.randn(101, generator=g)[1:].detach().requires_grad_(),  # 4-byte offset: generic variant
            torch.randn(70, generator=g).requires_grad_(),
        ]

    results = []
    for cls, kw in ((FusedAdam, dict(backend="triton")), (torch.optim.Adam, dict(foreach=False))):
        ps = params()
        opt = cls(ps, lr=0.01, weight_decay=0.1, amsgrad=True, **kw)
        for s in range(3):
            gg = torch.Generator().manual_seed(100 + s)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg) * 4.0  # contiguous, whatever the param's strides
            if cls is FusedAdam:
                opt.step(grad_scale=torch.tensor(4.0))
            else:
                for p in ps:
                    p.grad.div_(4.0)
                opt.step()
        results.append((ps, opt))
    (ours, o), (ref, r) = results
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(a.grad, b.grad)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(o.state[a][k], r.state[b][k])
    entry = next(e for e in small_chunks._cache.values() if len(e.lists[0]) == 4)
    assert entry.launches[0].aligned is False and list(entry.launches[0].scratch) == [1]


@requires_triton_interpreter
def test_table_is_reused_and_rebuilt_when_states_change():
    tb = _tb()
    ps = [torch.randn(n).requires_grad_() for n in (3, 50)]
    opt = FusedAdam(ps, backend="triton")

    def step():
        for p in ps:
            p.grad = torch.randn(p.shape)  # new grads every step, as after zero_grad(set_to_none=True)
        opt.step()

    def entry():
        return tb._cache[id(opt._plans[0].parts[0].state_steps[0])]

    step()
    first = entry()
    table = first.launches[0].table
    step()
    assert entry() is first and first.launches[0].table is table
    assert first.launches[0].grad_ptrs == [p.grad.data_ptr() for p in ps]
    part = opt._plans[0].parts[0]  # a direct caller with new lists of the same tensors keeps the table
    fresh = [list(x) for x in (part.params, [p.grad for p in ps], part.exp_avgs, part.exp_avg_sqs,
                               part.max_exp_avg_sqs, part.state_steps)]
    tb.step(*fresh, opt._hyper(opt.param_groups[0]), None, None)
    assert entry() is first and first.launches[0].table is table
    opt.state[ps[1]]["exp_avg"] = torch.zeros(50)  # a new state tensor: new plan, new table
    step()
    second = entry()
    assert second is not first
    ps[0].data = torch.randn(3)  # the param's storage swapped under the optimizer: new table
    step()
    assert entry() is not second and entry().param_ptrs[0] == ps[0].data_ptr()


@requires_triton_interpreter
def test_declines_with_reasons(monkeypatch):
    tb = _tb()
    from fused_adam.backends import Hyper

    hp = Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, False)
    assert tb.unsupported(torch.device("cpu"), torch.float32, hp) is None
    assert "fp64" in tb.unsupported(torch.device("cpu"), torch.float64, hp)
    diff = Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, True)
    assert "reference" in tb.unsupported(torch.device("cpu"), torch.float32, diff)
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run.*fp64"):
        FusedAdam([p], backend="triton").step()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in tb.unsupported(torch.device("cpu"), torch.float32, hp)
    q = torch.randn(3, requires_grad=True)
    q.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        FusedAdam([q], backend="triton").step()


# ---- CUDA ------------------------------------------------------------------------------------------------------

compiled = pytest.mark.skipif(INTERPRETING, reason="the CUDA tests run compiled kernels, not the interpreter")


def _cuda_pair(dtype, kwargs, cls_name="Adam", steps=10, shapes=((1,), (7,), (0,), (3, 5), (1000,), (65537,), (256, 257))):
    """Train the same params on backend='triton' and on the reference backend, both on CUDA."""
    ours_cls, _ = ADAM_CLASSES[cls_name]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    out = []
    for backend in ("triton", "reference"):
        ps = [p.cuda().requires_grad_() for p in init]
        opt = ours_cls(ps, backend=backend, **kwargs)
        gg = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg, dtype=torch.float64).to(dtype).cuda()
            opt.step()
        out.append((ps, opt))
    return out


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
@requires_cuda
@requires_triton
@compiled
def test_cuda_matches_reference(optim_input, dtype, cls_name):
    kwargs = dict(optim_input.kwargs)
    if cls_name == "AdamW":
        kwargs.pop("decoupled_weight_decay", None)
    if dtype == torch.float16:
        kwargs["eps"] = max(kwargs.get("eps", 1e-8), 0.1)
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(b.cuda() if isinstance(b, torch.Tensor) else b for b in kwargs["betas"])
    (ours, o), (ref, r) = _cuda_pair(dtype, kwargs, cls_name)
    assert o.dispatch[0][0].backend == "triton"
    # Same fp32 math and one rounding per store on both sides: a few ulps of the dtype after 10 steps.
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
           torch.float16: dict(atol=2e-3, rtol=2e-3)}[dtype]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in r.state[b]:
                torch.testing.assert_close(o.state[a][k], r.state[b][k], **tol)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS[:7], ids=repr)
@requires_cuda
@requires_triton
@compiled
def test_cuda_parity_with_torch(optim_input, dtype, cls_name):
    """The shared harness on CPU tensors cannot reach CUDA; here torch.optim on CUDA is the oracle for fp32 and
    the fp64 run for low precision, with the harness's derived bound."""
    from parity import K_LOW_PRECISION, _adjust, make_grads, make_params

    kwargs = _adjust(optim_input.kwargs, dtype)
    if cls_name == "AdamW":
        kwargs.pop("decoupled_weight_decay", None)
    ours_cls, torch_cls = ADAM_CLASSES[cls_name]
    params0 = make_params(dtype)

    def run(cls, dt, **extra):
        ps = [p.detach().clone().to("cuda", dt).requires_grad_() for p in params0]
        opt = cls(ps, **kwargs, **extra)
        for s in range(20):
            for p, gr in zip(ps, make_grads(params0, s)):
                p.grad = gr.to("cuda", dt)
            opt.step()
        return ps

    ours = run(ours_cls, dtype, backend="triton")
    ref = run(torch_cls, dtype, foreach=False)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach())
        return
    wide = run(torch_cls, torch.float64, foreach=False)
    for a, b, w in zip(ours, ref, wide):
        if a.numel() == 0:
            continue
        ours_err = (a.detach().double() - w.detach()).abs().max().item()
        torch_err = (b.detach().double() - w.detach()).abs().max().item()
        floor = torch.finfo(dtype).eps / 2 * w.detach().abs().max().item()
        assert ours_err <= K_LOW_PRECISION * torch_err + floor


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@requires_cuda
@requires_triton
@compiled
def test_cuda_graph_capture_matches_eager(dtype):
    """capturable=True: step() captured in a CUDA graph and replayed equals eager steps on the same grads."""
    g = torch.Generator().manual_seed(7)
    shapes = ((3,), (1000,), (65537,), (64, 33))
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(6)]
    lr = torch.tensor(0.01, device="cuda")

    eager = [p.cuda().requires_grad_() for p in init]
    opt_e = FusedAdamW(eager, lr=lr.clone(), weight_decay=0.1, amsgrad=True, capturable=True, backend="triton")
    for s in range(6):
        for p, gr in zip(eager, grads[s]):
            p.grad = gr.cuda()
        opt_e.step()

    ps = [p.cuda().requires_grad_() for p in init]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = FusedAdamW(ps, lr=lr.clone(), weight_decay=0.1, amsgrad=True, capturable=True, backend="triton")
    # Warm up on a side stream (states, table, compiled kernels), then undo its effect by re-initializing.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, gr in zip(ps, grads[0]):
            p.grad.copy_(gr.cuda())
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, p0 in zip(ps, init):
            p.copy_(p0.cuda())
        for p in ps:
            for k, v in opt.state[p].items():
                v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(6):
        for p, gr in zip(ps, grads[s]):
            p.grad.copy_(gr.cuda())
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ps, eager):
        assert float(opt.state[a]["step"]) == 6.0
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][k], opt_e.state[b][k], atol=0, rtol=0)
