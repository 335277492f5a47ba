"""The Triton backend: parity with torch on CPU tensors under the Triton interpreter, and on CUDA when there is one.

The interpreter tests need TRITON_INTERPRET=1 before triton is first imported, and that must not leak into the
other test modules of a pytest process (test_triton_ptx.py compiles for real). So the README's test command
runs this file in its own pytest process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_triton_backend.py   (interpreter tests)
    .venv/bin/python -m pytest -q tests/test_triton_backend.py                      (CUDA tests, on a GPU machine)
"""
from __future__ import annotations

import gc
import importlib.util
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


@requires_triton
def test_host_step_counts_packed_separate_and_replaced():
    """NOTE [host steps]: step counts that are views into shared buffers (two here, interleaved in the list) are
    read and incremented by a gather and a scatter per buffer, separate tensors one by one; either way the values
    before the step come back in list order and each count goes up by one, also after a step tensor is replaced.
    Elements of a buffer that are no one's step stay as they are."""
    from types import SimpleNamespace

    tb = _tb()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 100, (300,), generator=g).float(), torch.randint(0, 100, (200,), generator=g).float()
    views = [a[i] for i in range(0, 300, 2)] + [b[i] for i in range(1, 200, 2)]  # 250 steps, every other element
    steps = [views[i] for i in torch.randperm(len(views), generator=g).tolist()]
    entry = SimpleNamespace(host_steps=None)
    for replace in (None, 7):
        if replace is not None:
            steps[replace] = torch.tensor(41.0)  # replaced (load_state_dict, `.data = ...`): seen by its address
        a0, b0, expected = a.clone(), b.clone(), [float(t) for t in steps]
        assert tb._count_host_steps(entry, steps) == expected
        assert entry.host_steps[1] is not None  # the gather/scatter path
        assert [float(t) for t in steps] == [x + 1 for x in expected]
        assert torch.equal(a[1::2], a0[1::2]) and torch.equal(b[0::2], b0[0::2])  # no one's steps: untouched
    separate = [torch.tensor(float(i)) for i in range(5)]
    entry = SimpleNamespace(host_steps=None)
    assert tb._count_host_steps(entry, separate) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert entry.host_steps[1] is None  # the per-tensor path
    assert [float(t) for t in separate] == [1.0, 2.0, 3.0, 4.0, 5.0]


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


# ---- interpreter: the options beyond torch (backends/__init__.py's FEATURES) -----------------------------------
# tests/test_beyond_torch.py picks its backends on a CPU device, where triton runs only in this (interpreter)
# process: its compositions run here with backend="triton".


def _beyond():
    import test_beyond_torch

    return test_beyond_torch


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_match_torch_composition(dtype):
    _beyond().test_master_weights_match_fp32_adam_on_the_master("triton", dtype)


@requires_triton_interpreter
@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
def test_state_dtype_matches_torch_composition(param_dtype, state_dtype):
    _beyond().test_state_dtype_matches_torch_composition("triton", param_dtype, state_dtype)


@requires_triton_interpreter
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_clip_grad_norm_then_adam(max_norm):
    _beyond().test_max_grad_norm_matches_clip_grad_norm_then_adam("triton", max_norm)


@requires_triton_interpreter
def test_stochastic_rounding_resume_is_bitwise(tmp_path):
    _beyond().test_stochastic_rounding_resume_is_bitwise("triton", tmp_path)


@requires_triton_interpreter
def test_stochastic_rounding_keeps_small_updates():
    _beyond().test_stochastic_rounding_keeps_small_updates("triton")


def _train(backend: str, dtype, kwargs: dict, steps: int = 6, grad_scale: float | None = None, device: str = "cpu"):
    """Params of several layouts (a transposed one, a non-dense view: scratch copies) trained on one backend."""
    g = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((1,), (7,), (67,), (5, 13), (130,))]
    init += [torch.randn(6, 40, generator=g, dtype=torch.float64).t(), torch.randn(8, 24, generator=g, dtype=torch.float64)[:, ::2]]
    ps = [p.to(device, dtype).requires_grad_() for p in init]
    opt = FusedAdamW([{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3}], lr=1e-2, weight_decay=0.1,
                     backend=backend, **kwargs)
    gg = torch.Generator().manual_seed(12)
    for s in range(steps):
        for i, p in enumerate(ps):
            # param 1 skips steps 1 and 2: mixed per-tensor steps from step 3 on
            has = not (i == 1 and s in (1, 2))
            p.grad = torch.randn(p.shape, generator=gg, dtype=torch.float64).to(device, dtype) * 3 if has else None
            if has and grad_scale is not None:
                p.grad *= grad_scale
        if grad_scale is not None:
            opt.step(grad_scale=torch.tensor(grad_scale, device=device), found_inf=torch.tensor(0.0, device=device))
        else:
            opt.step()
    return ps, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


FEATURE_CASES = [  # (param dtype, options): each feature alone and in the combinations that share a store
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float16, dict(master_weights=True, amsgrad=True)),
    (torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype=torch.bfloat16, amsgrad=True)),
    (torch.float32, dict(state_dtype=torch.float16)),
    (torch.bfloat16, dict(state_dtype=torch.float32, amsgrad=True)),
    (torch.float16, dict(state_dtype=torch.float32)),
    (torch.bfloat16, dict(stochastic_rounding=True, seed=5, amsgrad=True)),
    (torch.float32, dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=2**40 + 3, amsgrad=True)),
    (torch.bfloat16, dict(stochastic_rounding=True, master_weights=True, state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(stochastic_rounding=True, capturable=True, amsgrad=True)),
    (torch.float32, dict(max_grad_norm=0.5, amsgrad=True)),
    (torch.float32, dict(max_grad_norm=0.5, state_dtype=torch.bfloat16, stochastic_rounding=True, capturable=True)),
]


def _case_id(x) -> str:
    return str(x) if isinstance(x, torch.dtype) else ",".join(sorted(x))


@requires_triton_interpreter
@pytest.mark.parametrize("dtype, kwargs", FEATURE_CASES, ids=_case_id)
def test_features_match_reference(dtype, kwargs):
    """Every stored array against the reference backend (the oracle of each feature): the same fp32 math and
    one rounding per store. Low-precision stores (round-to-nearest or stochastic) are bitwise the reference's;
    fp32 values within a few ulps (the kernel's fma forms vs ATen's addcdiv: the existing fp32 parity bound)."""
    (ours, o), (ref, r) = _train("triton", dtype, kwargs), _train("reference", dtype, kwargs)
    assert [d.backend for d in o.dispatch[0]] == ["triton"] and [d.backend for d in o.dispatch[1]] == ["triton"]
    for a, b in zip(ours, ref):
        pairs = [("param", a.detach(), b.detach())] + [(k, o.state[a][k], r.state[b][k]) for k in r.state[b] if k != "step"]
        assert {k for k, _, _ in pairs} - {"param"} == set(o.state[a]) - {"step"}
        for k, x, y in pairs:
            assert x.dtype == y.dtype, k
            if x.dtype == torch.float32:
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
            else:
                assert torch.equal(_bits(x), _bits(y)), k
        if "master_param" in o.state[a]:
            assert torch.equal(_bits(a.detach()), _bits(o.state[a]["master_param"].to(dtype)))  # round to nearest


@requires_triton_interpreter
def test_clip_under_grad_scaler_matches_reference():
    """AMP and clipping in one pass: the stored grad is the unscaled, unclipped one; the update uses the clipped."""
    kwargs = dict(max_grad_norm=0.5, amsgrad=True)
    ours, o = _train("triton", torch.float32, kwargs, grad_scale=1024.0)
    ref, r = _train("reference", torch.float32, kwargs, grad_scale=1024.0)
    torch.testing.assert_close(o.grad_norm, r.grad_norm, atol=0, rtol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):  # Adam's update is nearly scale-invariant: the
            torch.testing.assert_close(o.state[a][k], r.state[b][k], atol=0, rtol=0)  # states show the coefficient


if INTERPRETING and importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from fused_adam.backends import triton as _tbm

    @triton.jit
    def _sr_probe(x_ptr, out_ptr, seed_key, step, tensor_id, start, N: tl.constexpr):
        # The kernel's stochastic store of N fp32 values as elements start.. of a tensor (exp_avg's stream).
        offs = tl.arange(0, N)
        seed_key, step = tl.full([], seed_key, tl.int32), tl.full([], step, tl.float32)
        tensor_id, start = tl.full([], tensor_id, tl.int64), tl.full([], start, tl.int64)
        elem_base, key_p, key_m, key_v, key_x = _tbm._sr_keys(seed_key, step, tensor_id, start)
        _tbm._store(out_ptr + offs, tl.load(x_ptr + offs), None, False, True, True, elem_base + offs.to(tl.uint32), key_m)


def _sr_expected(x: torch.Tensor, salt: int, start: int) -> torch.Tensor:
    """reference.bf16_stochastic for elements start.. of a tensor (its indices start at 0)."""
    from fused_adam.backends.reference import _fmix32

    index = torch.arange(start, start + x.numel(), dtype=torch.int64)
    rand = _fmix32((index & 0xFFFFFFFF) ^ salt ^ (((index >> 32) * 0x27D4EB2F) & 0xFFFFFFFF)) & 0xFFFF
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + rand) >> 16
    rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16).view(torch.bfloat16)
    return torch.where((u & 0x7F800000) == 0x7F800000, x.to(torch.bfloat16), rounded)


@requires_triton_interpreter
@pytest.mark.parametrize("start", [0, 3 << 16, (1 << 32) + (5 << 16), (7 << 32) - (1 << 16)], ids=hex)
@pytest.mark.parametrize("seed", [0, 1234, 2**64 - 1])
def test_stochastic_rounding_bits_equal_the_reference(seed, start):
    """The kernel's salt (from the host's seed part, the step and the tensor id) and per-element bits round the
    same fp32 values to the same bf16 bits as reference.bf16_stochastic, at element indices past 2^32 too
    (the hi32 part of sr_bits), with inf, NaN, -0, subnormals and values that round up to inf."""
    from fused_adam.backends.reference import bf16_stochastic, sr_salt

    n = 4096
    g = torch.Generator().manual_seed(seed % 1000)
    x = torch.randn(n, generator=g) * torch.logspace(-40, 38, n)  # reaches fp32 subnormals and huge values
    x[:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.3e38, -3.3e38, 1e-45])
    step, tensor_id = 77.0, 5
    salt = sr_salt(seed, int(step), tensor_id, 1)
    expected = _sr_expected(x, salt, start)
    if start == 0:
        assert torch.equal(_bits(expected), _bits(bf16_stochastic(x, salt)))
    out = torch.empty(n, dtype=torch.bfloat16)
    _sr_probe[(1,)](x, out, _tbm._sr_seed_key(seed), step, tensor_id, start, N=n)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(_bits(out[~nan]), _bits(expected[~nan]))


@requires_triton_interpreter
@pytest.mark.parametrize("capturable", [False, True])
def test_stochastic_rounding_in_the_step_is_the_references(small_chunks, capturable):
    """End to end: with beta1 = 0 the new exp_avg is the fp32 grad itself, so its bf16 store must be exactly
    bf16_stochastic(grad, sr_salt(seed, step, tensor id, exp_avg's stream)): tensors of several chunks (64
    elements here), ids over two param groups, per-tensor steps (mixed: host scalars; capturable: device)."""
    from fused_adam.backends.reference import bf16_stochastic, sr_salt

    g = torch.Generator().manual_seed(13)
    ps = [torch.randn(n, generator=g).requires_grad_() for n in (1, 150, 64, 200)]
    seed = 99
    opt = FusedAdam([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-3, betas=(0.0, 0.999), state_dtype=torch.bfloat16,
                    stochastic_rounding=True, seed=seed, capturable=capturable, backend="triton")
    for s in range(4):
        grads = [torch.randn(p.shape, generator=g) * 10.0 ** (s - 2) if (s != 1 or i != 2) else None for i, p in enumerate(ps)]
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt.step()
        for i, (p, gr) in enumerate(zip(ps, grads)):
            if gr is None:
                continue
            step = int(opt.state[p]["step"].item())
            expected = bf16_stochastic(gr, sr_salt(seed, step, i, 1))
            assert torch.equal(_bits(opt.state[p]["exp_avg"]), _bits(expected)), (s, i)
    assert [int(opt.state[p]["step"]) for p in ps] == [4, 4, 3, 4]


@requires_triton_interpreter
def test_features_declared_and_declines_with_reasons():
    tb = _tb()
    from fused_adam.backends import Hyper, missing_features

    hp = Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, False, master_weights=True,
               state_dtype=torch.float32, stochastic_rounding=True, clip=True)
    assert missing_features(tb, hp) is None and tb.unsupported(torch.device("cpu"), torch.bfloat16, hp) is None
    fp64_states = Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, False, state_dtype=torch.float64)
    assert "state_dtype=torch.float64" in tb.unsupported(torch.device("cpu"), torch.float32, fp64_states)
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run.*state_dtype=torch.float64"):
        FusedAdam([p], state_dtype=torch.float64, backend="triton").step()
    auto = FusedAdam([p], state_dtype=torch.float64)  # auto on a CPU device never picks triton; the reason is kept
    auto.step()
    assert auto.dispatch[0][0].backend != "triton"


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


@pytest.mark.parametrize("dtype, kwargs", FEATURE_CASES, ids=_case_id)
@requires_cuda
@requires_triton
@compiled
def test_cuda_features_match_reference(dtype, kwargs):
    """The compiled kernels against the reference backend on CUDA. The reference's fp32 math runs as separate
    torch CUDA kernels (no guarantee of the kernel's fma forms), so a stored value may differ by an ulp of the
    math and then by one ulp of its dtype after rounding (either rounding mode); the SR bits themselves are
    checked bitwise by the interpreter tests and by test_cuda_stochastic_rounding_bits."""
    (ours, o), (ref, r) = _train("triton", dtype, kwargs, device="cuda"), _train("reference", dtype, kwargs, device="cuda")
    assert [d.backend for d in o.dispatch[0]] == ["triton"]
    for a, b in zip(ours, ref):
        pairs = [("param", a.detach(), b.detach())] + [(k, o.state[a][k], r.state[b][k]) for k in r.state[b] if k != "step"]
        for k, x, y in pairs:
            assert x.dtype == y.dtype, k
            tol = dict(atol=1e-5, rtol=1e-5) if x.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(x.float(), y.float(), **tol, msg=k)
        if "master_param" in o.state[a]:
            assert torch.equal(_bits(a.detach()), _bits(o.state[a]["master_param"].to(dtype)))


@requires_cuda
@requires_triton
@compiled
@pytest.mark.parametrize("capturable", [False, True])
def test_cuda_stochastic_rounding_bits(capturable):
    """As test_stochastic_rounding_in_the_step_is_the_references, compiled: beta1 = 0 makes the new exp_avg the
    fp32 grad, so its bf16 store is exactly bf16_stochastic(grad, salt), cvt and integer ops of the GPU included."""
    from fused_adam.backends.reference import bf16_stochastic, sr_salt

    g = torch.Generator().manual_seed(13)
    ps = [torch.randn(n, generator=g).cuda().requires_grad_() for n in (1, 70000, 1000)]
    opt = FusedAdam(ps, lr=1e-3, betas=(0.0, 0.999), state_dtype=torch.bfloat16, stochastic_rounding=True, seed=99,
                    capturable=capturable, backend="triton")
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for p, gr in zip(ps, grads):
            p.grad = gr.cuda()
        opt.step()
        for i, (p, gr) in enumerate(zip(ps, grads)):
            expected = bf16_stochastic(gr, sr_salt(99, int(opt.state[p]["step"].item()), i, 1))
            assert torch.equal(_bits(opt.state[p]["exp_avg"].cpu()), _bits(expected)), i
