"""The Triton backend: parity with torch on CPU tensors under the Triton interpreter, and on CUDA when there is one.

The interpreter tests need TRITON_INTERPRET=1 before triton is first imported, and that must not leak into the
other test modules of a pytest process (test_triton_ptx.py compiles for real). So the README's test command
runs this file in its own pytest process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_triton_backend.py   (interpreter tests)
    .venv/bin/python -m pytest -q tests/test_triton_backend.py                      (CUDA tests, on a GPU machine)
The compositions of the options beyond torch (test_beyond_torch.py) and the plan mutations (test_plan_mutations.py)
run backend="triton" themselves under the interpreter.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from conftest import requires_cuda, requires_triton, requires_triton_interpreter
from fused_adam import FusedAdam, FusedAdamW
from parity import DTYPES, FEATURE_CASES, OPTIM_INPUTS, assert_parity, bits, feature_id, make_grads, make_params, train

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ADAM_CLASSES = {"Adam": (FusedAdam, torch.optim.Adam), "AdamW": (FusedAdamW, torch.optim.AdamW)}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # on CUDA (fp64 math too, on the interpreter)


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


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the Adam kernel: (prepared partition, SCALARS/ALIGNED/... flags), the launch still run."""
    tb = _tb()
    seen = []
    real = tb._launch

    def spy(prep, *args):
        seen.append((prep, args[-1]))
        return real(prep, *args)

    monkeypatch.setattr(tb, "_launch", spy)
    return seen


@pytest.fixture
def uploads(monkeypatch):
    """The row masks of every host-to-device copy of the address rows."""
    tb = _tb()
    seen = []
    real = tb._upload_rows

    def spy(prep, rows, *args):
        seen.append(rows)
        return real(prep, rows, *args)

    monkeypatch.setattr(tb, "_upload_rows", spy)
    return seen


def _set_grads(params, params0, step):
    for p, g in zip(params, make_grads(params0, step)):
        p.grad = g.to(p.dtype)


# ---- interpreter: parity ---------------------------------------------------------------------------------------


@requires_triton_interpreter
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_triton_matches_torch(optim_input, dtype, cls_name):
    assert_parity("triton", cls_name, optim_input.kwargs, dtype)


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_capturable_decay_in_the_tensor_lrs_dtype(dtype):
    """capturable=True with a Tensor lr: AdamW's 1 - lr * wd is computed in the lr's dtype on the device, as torch
    (and the host path) compute it; in fp64 it drifted 7.6e-7 from torch over 20 steps of zero grads."""
    params0 = make_params(dtype, ((64,), (7,)))
    grads = lambda p: torch.zeros_like(p)  # noqa: E731 (the update is the decay alone)
    out = []
    for cls, kw in ((FusedAdamW, dict(backend="triton", capturable=True)), (torch.optim.AdamW, dict(foreach=False))):
        params = [p.detach().clone().requires_grad_() for p in params0]
        opt = cls(params, lr=torch.tensor(0.01), weight_decay=0.1, **kw)
        for _ in range(20):
            for p in params:
                p.grad = grads(p)
            opt.step()
        out.append(params)
    for a, b in zip(*out):
        torch.testing.assert_close(a.detach(), b.detach())


@requires_triton_interpreter
def test_bf16_subnormals_load_exactly():
    """bf16 subnormals (the interpreter's own bf16 -> fp32 conversion loses them; the load is a shift of the bits
    there): with lr=0 the params stay, and the moments are the reference backend's, bitwise."""
    vals = [1e-39, 3e-39, -5e-40, 1.8e-40, 1.0, -2.0, 0.0]
    out = {}
    for backend in ("triton", "reference"):
        p = torch.tensor(vals, dtype=torch.bfloat16, requires_grad=True)
        opt = FusedAdam([p], lr=0.0, backend=backend)
        p.grad = torch.tensor(vals[::-1], dtype=torch.bfloat16)
        opt.step()
        out[backend] = (p.detach(), dict(opt.state[p]))
    assert torch.equal(bits(out["triton"][0]), bits(torch.tensor(vals, dtype=torch.bfloat16)))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(bits(out["triton"][1][key]), bits(out["reference"][1][key])), key


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_and_tile_boundaries(small_chunks, dtype):
    # chunk 64, tile 16: sizes at tile and chunk boundaries +-1, several chunks, 1, empty.
    shapes = ((1,), (15,), (16,), (17,), (63,), (64,), (65,), (128,), (129,), (0,), (5, 13))
    # 20 steps: the harness's low-precision bound is too tight for 3 (the reference backend fails it there too).
    assert_parity("triton", "AdamW", {"weight_decay": 0.1, "amsgrad": True}, dtype, shapes=shapes)


@requires_triton_interpreter
def test_many_tensors_one_launch(small_chunks, launches, monkeypatch):
    """300 tensors, ~500 chunks: one launch per step over one table, every chunk finding its own tensor."""
    monkeypatch.setattr(small_chunks, "INTERPRET_BLOCK", 64)  # one tile per chunk: the table is what is tested
    shapes = tuple((1 + (7 * i) % 150,) for i in range(300))
    assert_parity("triton", "Adam", {"weight_decay": 0.1}, torch.float32, steps=2, shapes=shapes)
    ours = [(prep, flags) for prep, flags in launches if prep.out.shape[1] == 300]
    assert len(ours) == 2  # one per step
    assert ours[0][0].n_chunks == sum(-(-s[0] // 64) for s in shapes) == ours[0][0].grid


@requires_triton_interpreter
@pytest.mark.parametrize("grid", [1, 3, 7])
def test_persistent_programs_stride_the_chunk_list(small_chunks, launches, monkeypatch, grid):
    """A grid smaller than the chunk list (the GPU's: programs per SM x SMs): each program takes chunks i, i + grid,
    ...; every chunk is stepped exactly once (the parity of every tensor shows it), tails masked."""
    monkeypatch.setattr(small_chunks, "_grid", lambda device, n_chunks: min(n_chunks, grid))
    shapes = ((1,), (64,), (65,), (200,), (0,), (3, 50), (129,))
    assert_parity("triton", "AdamW", {"weight_decay": 0.1, "amsgrad": True}, torch.float32, steps=3, shapes=shapes)
    assert launches and all(prep.grid == grid < prep.n_chunks for prep, _ in launches)


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


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mixed_steps_in_one_partition(launches, dtype):
    """Step counts that differ inside one partition (set in place: read where they live) take the per-tensor
    scalars; equal counts take the uniform ones."""
    params0 = make_params(dtype, ((5,), (9,), (3,)))
    ours = [p.clone().requires_grad_() for p in params0]
    ref = [p.clone().requires_grad_() for p in params0]
    o = FusedAdamW(ours, lr=0.01, backend="triton")
    r = torch.optim.AdamW(ref, lr=0.01, foreach=False)
    for s in range(4):
        if s == 2:
            for opt, ps in ((o, ours), (r, ref)):
                opt.state[ps[1]]["step"].fill_(10.0)
        for ps in (ours, ref):
            _set_grads(ps, params0, s)
        o.step()
        r.step()
        uniform = dtype == torch.float32 and s < 2
        assert launches[-1][1]["SCALARS"] == (0 if uniform else 1 if s < 2 else 2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(o.state[a]["exp_avg_sq"], r.state[b]["exp_avg_sq"])
        assert float(o.state[a]["step"]) == float(r.state[b]["step"])


# ---- interpreter: the host path (NOTE [triton host path]) ------------------------------------------------------


@requires_triton_interpreter
def test_only_the_rows_that_moved_are_uploaded(uploads):
    """The first step uploads every address row; a step with the same grads uploads nothing; new grads (as after
    zero_grad(set_to_none=True)) upload the grad row only; a param's `.data` replaced uploads its row."""
    tb = _tb()
    ps = [torch.randn(n).requires_grad_() for n in (3, 50)]
    opt = FusedAdam(ps, backend="triton")
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert uploads[-1] == (1 << tb._P) | (1 << tb._G) | (1 << tb._M) | (1 << tb._V)
    n = len(uploads)
    opt.step()
    assert len(uploads) == n
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert uploads[n:] == [1 << tb._G]
    with torch.no_grad():
        ps[1].data = ps[1].data.clone()
    opt.step()
    assert uploads[-1] == 1 << tb._P


@requires_triton_interpreter
def test_a_step_that_fails_after_the_pass_leaves_nothing_behind(monkeypatch):
    """An error between the check pass and the launch (here the upload of the moved grad row, as under CUDA graph
    capture) changes nothing, step counts included, and the next step uploads the rows the device lacks."""
    tb = _tb()
    params0 = make_params(torch.float32, ((7,), (4,)))
    ours = [p.clone().requires_grad_() for p in params0]
    ref = [p.clone().requires_grad_() for p in params0]
    o, r = FusedAdamW(ours, backend="triton"), torch.optim.AdamW(ref, foreach=False)
    kept = []
    for s in range(3):
        kept += [p.grad for p in ours]
        for ps in (ours, ref):
            _set_grads(ps, params0, s)
        if s == 2:  # (the grads of step 1 stay alive: a stale grad row would read them)
            before = [t.clone() for p in ours for t in (p, *o.state[p].values())]
            real = tb._upload_rows

            def fail(*args):
                raise RuntimeError("upload failed")

            monkeypatch.setattr(tb, "_upload_rows", fail)
            with pytest.raises(RuntimeError, match="upload failed"):
                o.step()
            monkeypatch.setattr(tb, "_upload_rows", real)
            assert all(torch.equal(a, b) for a, b in zip(before, [t for p in ours for t in (p, *o.state[p].values())]))
        o.step()
        r.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(o.state[a]["exp_avg"], r.state[b]["exp_avg"])
        assert o.state[a]["step"].item() == r.state[b]["step"].item()


@requires_triton_interpreter
def test_data_replaced_with_the_same_shape_is_stepped_where_it_lives():
    """`p.data = t` of the same shape: the step lands in t (torch's for-loop does the same)."""
    params0 = make_params(torch.float32, ((7,), (4,)))
    ours = [p.clone().requires_grad_() for p in params0]
    ref = [p.clone().requires_grad_() for p in params0]
    o, r = FusedAdamW(ours, backend="triton"), torch.optim.AdamW(ref, foreach=False)
    for s in range(4):
        if s == 2:
            new = torch.linspace(-1, 1, 7)
            ours[0].data, ref[0].data = new.clone(), new.clone()
        for ps in (ours, ref):
            _set_grads(ps, params0, s)
        o.step()
        r.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())


@requires_triton_interpreter
def test_data_replaced_with_another_shape_raises_before_writing():
    """`p.data = t` of another shape than its states: a clear error, and nothing at all written (on a GPU this
    stepped out of bounds before the check pass)."""
    ps = [torch.randn(5).requires_grad_(), torch.randn(7).requires_grad_()]
    opt = FusedAdamW(ps, backend="triton")
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    ps[1].data = torch.randn(8)
    ps[1].grad = torch.randn(8)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape \[7\], but params\[1\] has shape \[8\]"):
        opt.step()
    for p, (p0, s0) in zip(ps, before):
        assert torch.equal(p.detach(), p0)
        for k, v in s0.items():
            assert torch.equal(opt.state[p][k], v), k


@requires_triton_interpreter
def test_check_pass_python_stand_in():
    """_C.Partition.addresses' semantics, in the Python stand-in the backend uses where the extension lacks it:
    -1 and nothing written when a param has no grad; the rows that changed; the aligned and one-layout bits;
    errors naming the list, the index and the values; and the native pass's answers where it exists."""
    tb = _tb()
    ps = [torch.randn(6), torch.randn(4, 5).t()]
    ms, vs = [torch.zeros(6), torch.zeros(5, 4)], [torch.zeros(6), torch.zeros(5, 4)]
    steps = [torch.zeros(()), torch.zeros(())]
    checkers = [tb._PyPartition(ps, ms, vs, [], steps)]
    if tb._NATIVE_ADDRESSES:
        checkers.append(tb._C.Partition(ps, ms, vs, [], steps))
    for checker in checkers:
        out = torch.zeros(tb._ADDRESS_ROWS, 2, dtype=torch.int64)
        ps[0].grad = torch.randn(6)
        ps[1].grad = None
        assert checker.addresses(None, out) == (-1, None) and not out.any()
        ps[1].grad = torch.randn(5, 4)
        mask, count = checker.addresses(None, out)
        assert mask & tb._ROW_BITS == 0b1111 and not mask & tb._LAYOUT_BIT  # transposed param, contiguous states
        assert count is None and not mask & tb._UNIFORM_BIT  # no counts asked for
        assert out[tb._G].tolist() == [p.grad.data_ptr() for p in ps]
        assert checker.addresses(None, out)[0] & tb._ROW_BITS == 0
        grads = [torch.randn(6), torch.randn(5, 4)]
        assert checker.addresses(grads, out)[0] & tb._ROW_BITS == 1 << tb._G
        odd = torch.randn(7)[1:]  # a 4-byte offset
        assert not checker.addresses([odd, grads[1]], out)[0] & tb._ALIGNED_BIT
        with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[4, 5\], but params\[1\] has shape \[5, 4\]"):
            checker.addresses([grads[0], torch.randn(4, 5)], out)
        with pytest.raises(TypeError, match=r"grads\[0\] has dtype (torch\.float64|Double)"):
            checker.addresses([grads[0].double(), grads[1]], out)
        with pytest.raises(RuntimeError, match=r"grads\[0\] has layout (torch\.sparse_coo|Sparse)"):
            checker.addresses([grads[0].to_sparse(), grads[1]], out)
        expanded = torch.randn(1).expand(6)  # read-only: fine, unless the kernel writes the grads back
        assert checker.addresses([expanded, grads[1]], out)[0] & tb._ROW_BITS == 1 << tb._G
        with pytest.raises(RuntimeError, match=r"grads\[0\] has elements that share memory"):
            checker.addresses([expanded, grads[1]], out, grads_written=True)
        with pytest.raises(RuntimeError, match=r"params\[0\] and grads\[0\] share memory"):
            checker.addresses([ps[0].detach(), grads[1]], out)
        freed = torch.randn(6)
        freed.untyped_storage().resize_(0)
        with pytest.raises(RuntimeError, match=r"grads\[0\] needs 24 bytes of storage .* holds 0"):
            checker.addresses([freed, grads[1]], out)


@requires_triton
@pytest.mark.parametrize("packed", [True, False], ids=["views", "separate"])
def test_host_step_counts_read_and_bumped_by_the_check_pass(packed):
    """NOTE [host steps]: with `counts`, the check pass (native, and the Python one) writes the counts before the
    step into it, in list order, and bumps each by one: all equal comes back as one float (bit 8), else None with
    the counts per tensor. Counts packed as views into a buffer leave the buffer's other elements as they are; a
    failed check or a missing grad bumps nothing."""
    tb = _tb()
    n = 5
    ps = [torch.randn(3) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(3)
    ms, vs = [torch.zeros(3) for _ in ps], [torch.zeros(3) for _ in ps]
    buf = torch.full((2 * n,), -1.0)
    steps = list(buf[0::2].unbind()) if packed else [torch.tensor(0.0) for _ in ps]
    for s in steps:
        s.fill_(5.0)
    checkers = [tb._PyPartition(ps, ms, vs, [], steps)]
    if tb._NATIVE_ADDRESSES:
        checkers.append(tb._C.Partition(ps, ms, vs, [], steps))
    expected = 5.0
    for checker in checkers:
        out = torch.zeros(tb._ADDRESS_ROWS, n, dtype=torch.int64)
        counts = torch.empty(n)
        mask, count = checker.addresses(None, out, counts)
        assert mask & tb._UNIFORM_BIT and count == expected and counts.tolist() == [expected] * n
        expected += 1
        assert [float(s) for s in steps] == [expected] * n
        if packed:
            assert (buf[1::2] == -1.0).all()
        steps[3].add_(2.0)  # changed in place: read where it lives
        mask, count = checker.addresses(None, out, counts)
        before = [expected] * n
        before[3] += 2
        assert not mask & tb._UNIFORM_BIT and count is None and counts.tolist() == before
        assert [float(s) for s in steps] == [b + 1 for b in before]
        for s in steps:
            s.fill_(expected)
        ps[1].grad = None
        assert checker.addresses(None, out, counts) == (-1, None)
        ps[1].grad = torch.randn(3)
        with pytest.raises(RuntimeError, match=r"grads\[2\] has shape"):
            checker.addresses([p.grad for p in ps[:2]] + [torch.randn(4)] + [p.grad for p in ps[3:]], out, counts)
        assert [float(s) for s in steps] == [expected] * n


@requires_triton_interpreter
def test_step_count_data_replaced_is_read_where_it_lives():
    """`state["step"].data = t` on a count packed into a buffer: the next step reads and bumps t, as torch does."""
    params0 = make_params(torch.float32, [(5,)] * 40)
    ours = [p.clone().requires_grad_() for p in params0]
    ref = [p.clone().requires_grad_() for p in params0]
    o, r = FusedAdamW(ours, lr=0.1, backend="triton"), torch.optim.AdamW(ref, lr=0.1, foreach=False)
    for s in range(4):
        if s == 2:
            for opt, ps in ((o, ours), (r, ref)):
                opt.state[ps[1]]["step"].data = torch.tensor(50.0)
        for ps in (ours, ref):
            _set_grads(ps, params0, s)
        o.step()
        r.step()
    assert [float(o.state[p]["step"]) for p in ours] == [float(r.state[p]["step"]) for p in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())


# ---- interpreter: capturable -----------------------------------------------------------------------------------


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
    params0 = make_params(dtype, ((1,), (33,), (200,)), seed=2)
    out = []
    for capturable in (True, False):
        ps, opt = train("triton", params0, steps=8, capturable=capturable, **kwargs)
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


# ---- interpreter: layouts, declines ----------------------------------------------------------------------------


def _layouts(dtype):
    """params0 of the shapes the layouts below have, and make(): a transposed param (dense: in place), a non-dense
    view (staged on scratch copies), a param at a 4-byte offset (the generic, unaligned variant), plain ones."""
    params0 = make_params(dtype, ((1,), (7,), (67,), (5, 13), (40, 6), (8, 12), (100,)), seed=11)

    def make():
        ps = [p.clone() for p in params0]
        ps[4] = params0[4].t().contiguous().t()  # (40, 6) with strides (1, 40)
        wide = torch.zeros(8, 24, dtype=dtype)
        wide[:, ::2] = params0[5]
        ps[5] = wide[:, ::2]
        ps[6] = torch.cat([torch.zeros(1, dtype=dtype), params0[6]])[1:]
        return ps

    return params0, make


@requires_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_any_strides(small_chunks, launches, dtype):
    """Every layout is stepped right (torch's for-loop is the oracle; torch 2.13's fused CPU path is wrong for the
    transposed one), with grads that are contiguous whatever the param's strides, under grad scaling (the scaled
    grads of staged copies are written back)."""
    params0, make = _layouts(dtype)
    ours = [p.requires_grad_() for p in make()]
    ref = [p.requires_grad_() for p in make()]
    o = FusedAdam(ours, lr=0.01, weight_decay=0.1, amsgrad=True, backend="triton")
    r = torch.optim.Adam(ref, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for s in range(3):
        for ps in (ours, ref):
            for p, g in zip(ps, make_grads(params0, s)):
                p.grad = g.contiguous() * 4.0
        o.step(grad_scale=torch.tensor(4.0))
        for p in ref:
            p.grad.div_(4.0)
        r.step()
    assert not any(flags["ALIGNED"] for _, flags in launches)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach())
        torch.testing.assert_close(a.grad, b.grad)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(o.state[a][k], r.state[b][k])


@requires_triton_interpreter
def test_aligned_variant_runs_when_every_address_is(launches):
    params0 = make_params(torch.float32, ((8,), (64,), (3, 4)))
    train("triton", params0, steps=2)
    assert launches and all(flags["ALIGNED"] for _, flags in launches)


def _fake_part(dtype=torch.float32, device="cpu", **options):
    opts = dict(differentiable=False, state_dtype=dtype) | options
    return SimpleNamespace(dtype=dtype, device=torch.device(device), options=SimpleNamespace(**opts))


@requires_triton_interpreter
def test_declines_with_reasons(monkeypatch):
    tb = _tb()
    assert tb.BACKEND.supports(_fake_part()) is None
    assert tb.BACKEND.supports(_fake_part(torch.float64)) is None
    assert tb.BACKEND.supports(_fake_part(torch.float32, state_dtype=torch.float64)) is None
    assert "reference" in tb.BACKEND.supports(_fake_part(differentiable=True))
    assert "torch.float8_e4m3fn" in tb.BACKEND.supports(_fake_part(torch.float8_e4m3fn))
    assert "'meta'" in tb.BACKEND.supports(_fake_part(device="meta"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in tb.BACKEND.supports(_fake_part())
    q = torch.randn(3, requires_grad=True)
    q.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        FusedAdam([q], backend="triton").step()


# ---- interpreter: the options beyond torch (parity.FEATURE_CASES) ----------------------------------------------


@requires_triton_interpreter
@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_features_match_reference(case):
    """Every stored array against the reference backend (the oracle of each feature), over every layout (staged
    copies included) and two param groups: the same fp32 math and one rounding per store. Low-precision stores
    (round-to-nearest or stochastic) are bitwise the reference's; fp32 values within a few ulps (the kernel's fma
    forms vs ATen's addcdiv: the existing fp32 parity bound)."""
    dtype, kwargs = case
    params0, make = _layouts(dtype)
    (ours, o), (ref, r) = (train(b, params0, steps=6, make=make, lr=1e-2, weight_decay=0.1, **kwargs)
                           for b in ("triton", "reference"))
    assert [d.backend for d in o.dispatch[0]] == ["triton"]
    for a, b in zip(ours, ref):
        pairs = [("param", a.detach(), b.detach())] + [(k, o.state[a][k], r.state[b][k]) for k in r.state[b] if k != "step"]
        assert {k for k, _, _ in pairs} - {"param"} == set(o.state[a]) - {"step"}
        for k, x, y in pairs:
            assert x.dtype == y.dtype, k
            if x.dtype == torch.float32:
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
            else:
                assert torch.equal(bits(x), bits(y)), k
        if "master_param" in o.state[a]:
            assert torch.equal(bits(a.detach()), bits(o.state[a]["master_param"].to(dtype)))  # round to nearest


@requires_triton_interpreter
def test_clip_under_grad_scaler_matches_reference():
    """AMP and clipping in one pass: the stored grad is the unscaled, unclipped one; the update uses the clipped."""
    params0, make = _layouts(torch.float32)
    out = []
    for backend in ("triton", "reference"):
        ps = [p.requires_grad_() for p in make()]
        opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, amsgrad=True, backend=backend)
        for s in range(4):
            for p, g in zip(ps, make_grads(params0, s)):
                p.grad = g * 1024.0
            opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
        out.append((ps, opt))
    (ours, o), (ref, r) = out
    torch.testing.assert_close(o.grad_norm, r.grad_norm, atol=0, rtol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):  # Adam's update is nearly scale-invariant: the
            torch.testing.assert_close(o.state[a][k], r.state[b][k], atol=0, rtol=0)  # states show the coefficient


if INTERPRETING and _tb().triton is not None:
    import triton
    import triton.language as tl

    _tbm = _tb()

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
        assert torch.equal(bits(expected), bits(bf16_stochastic(x, salt)))
    out = torch.empty(n, dtype=torch.bfloat16)
    _sr_probe[(1,)](x, out, _tbm._sr_seed_key(seed), step, tensor_id, start, N=n)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(bits(out[~nan]), bits(expected[~nan]))


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
            assert torch.equal(bits(opt.state[p]["exp_avg"]), bits(expected)), (s, i)
    assert [int(opt.state[p]["step"]) for p in ps] == [4, 4, 3, 4]


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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
    # Same math and one rounding per store on both sides: a few ulps of the dtype after 10 steps.
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}[dtype]
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
    from parity import K_LOW_PRECISION, _adjust

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


@requires_cuda
@requires_triton
@compiled
def test_cuda_one_launch_with_a_grid_sized_to_the_device(launches):
    """500 tensors: one launch per step, at most PROGRAMS_PER_SM programs per SM striding the chunk list."""
    tb = _tb()
    shapes = [(1 + (977 * i) % 70000,) for i in range(500)]
    params0 = make_params(torch.float32, shapes)
    ps = [p.cuda().requires_grad_() for p in params0]
    opt = FusedAdamW(ps, backend="triton")
    for s in range(2):
        for p, g in zip(ps, make_grads(params0, s)):
            p.grad = g.cuda()
        opt.step()
    assert len(launches) == 2
    prep = launches[0][0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert prep.grid == min(prep.n_chunks, tb.PROGRAMS_PER_SM * sms)


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


@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
@requires_cuda
@requires_triton
@compiled
def test_cuda_features_match_reference(case):
    """The compiled kernels against the reference backend on CUDA. The reference's fp32 math runs as separate
    torch CUDA kernels (no guarantee of the kernel's fma forms), so a stored value may differ by an ulp of the
    math and then by one ulp of its dtype after rounding (either rounding mode); the SR bits themselves are
    checked bitwise by the interpreter tests and by test_cuda_stochastic_rounding_bits."""
    dtype, kwargs = case
    params0, make = _layouts(dtype)

    def make_cuda():
        return [p.cuda() for p in make()]

    cuda0 = [p.cuda() for p in params0]
    (ours, o), (ref, r) = (train(b, cuda0, steps=6, make=make_cuda, lr=1e-2, weight_decay=0.1, **kwargs)
                           for b in ("triton", "reference"))
    assert [d.backend for d in o.dispatch[0]] == ["triton"]
    for a, b in zip(ours, ref):
        pairs = [("param", a.detach(), b.detach())] + [(k, o.state[a][k], r.state[b][k]) for k in r.state[b] if k != "step"]
        for k, x, y in pairs:
            assert x.dtype == y.dtype, k
            tol = dict(atol=1e-5, rtol=1e-5) if x.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(x.float(), y.float(), **tol, msg=k)
        if "master_param" in o.state[a]:
            assert torch.equal(bits(a.detach()), bits(o.state[a]["master_param"].to(dtype)))


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
            assert torch.equal(bits(opt.state[p]["exp_avg"].cpu()), bits(expected)), i
