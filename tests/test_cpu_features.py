"""The CPU kernel's options beyond torch (NOTE [cpu feature loops] in csrc/cpu/kernel.h): stochastic rounding bits,
every storage combination it is instantiated for, SIMD tails, threads, ISAs, layouts, and the combinations it
declines. tests/test_beyond_torch.py checks the same features against torch compositions on every backend."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_native
from cpu_kernel import assert_bitwise, cpu_isa, group_of, kernel_step, make_part, num_threads, op_step, supported_isas
from cpu_kernel import ulp_distance
from parity import FEATURE_CASES, bits, feature_id
from parity import train as _train

from fused_adam import FusedAdam, FusedAdamW
from fused_adam.backends import PartOptions
from fused_adam.backends.cpu import BACKEND
from fused_adam.backends.reference import bf16_stochastic, sr_salt

pytestmark = requires_native

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)

# (param dtype, state dtype, master): what the kernel is instantiated for, each with and without stochastic rounding.
SUPPORTED = [
    (F32, BF16, False),
    (BF16, F32, False),
    (F16, F32, False),
    (BF16, F32, True),
    (F16, F32, True),
    (BF16, BF16, True),
    (BF16, BF16, False),  # same dtype: the feature loop runs for stochastic rounding or clip
]
DECLINED = [(F64, BF16, False), (F32, F16, False), (F32, F64, False), (BF16, F16, False), (F16, BF16, False),
            (F16, F16, True)]


# ---- stochastic rounding: the bits of csrc/rounding.h, as the reference computes them ----------------------------


def _inputs(n: int, pdt, sdt, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(pdt)
    g = (torch.randn(n, generator=gen) * 1e-2).to(pdt)
    m = (torch.randn(n, generator=gen) * 1e-2).to(sdt)
    v = (torch.rand(n, generator=gen) * 1e-4).to(sdt)
    vmax = (torch.rand(n, generator=gen) * 2e-4).to(sdt)
    return p, g, m, v, vmax


@pytest.mark.parametrize("pdt, sdt, master", [(BF16, BF16, False), (F32, BF16, False), (BF16, F32, False), (BF16, BF16, True)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_stochastic_rounding_bits_equal_the_references(pdt, sdt, master, amsgrad):
    """The values the kernel rounds are the fp32 kernel's on the same (exactly widened) inputs; rounding them with
    the reference's bf16_stochastic and salts must give the kernel's stored bits exactly."""
    n = 100_003  # several chunks and threads, and a SIMD tail
    p, g, m, v, vmax = _inputs(n, pdt, sdt)
    master_p = (torch.randn(n) * 0.5) if master else None
    kw = dict(HP, weight_decay=1e-2, amsgrad=amsgrad, maximize=False, decoupled=True)
    wide = [t.to(F32, copy=True) for t in (p if not master else master_p, g, m, v, vmax)]
    kernel_step([wide[0]], [wide[1]], [wide[2]], [wide[3]], [wide[4]] if amsgrad else [], [torch.tensor(4.0)], **kw)
    ours = [t.clone() for t in (p, g, m, v, vmax)]
    extra = dict(master_params=[master_p.clone()]) if master else {}
    kernel_step([ours[0]], [ours[1]], [ours[2]], [ours[3]], [ours[4]] if amsgrad else [], [torch.tensor(4.0)],
                    stochastic_rounding=True, tensor_ids=[7], seed=2**64 - 3 - 2**64, **extra, **kw)
    seed = 2**64 - 3  # the binding takes the 64-bit seed's two's complement
    stored = {"param": (0, wide[0], ours[0]), "exp_avg": (1, wide[2], ours[2]), "exp_avg_sq": (2, wide[3], ours[3])}
    if amsgrad:
        stored["max_exp_avg_sq"] = (3, wide[4], ours[4])
    for name, (stream, w, got) in stored.items():
        if got.dtype != BF16:
            assert torch.equal(got, w), name
        elif name == "param" and master:  # the master's copy rounds to nearest
            assert torch.equal(bits(got), bits(w.to(BF16))), name
        else:
            expected = bf16_stochastic(w, sr_salt(seed, 5, 7, stream))
            assert torch.equal(bits(got), bits(expected)), name
            assert not torch.equal(bits(got), bits(w.to(BF16))), name  # and it is not round-to-nearest


def test_stochastic_rounding_of_special_values():
    """inf (from grads that are inf, and from ones that overflow), signed zeros, subnormals, exact bf16 values;
    NaN stays NaN. One step from zero states: exp_avg is the fp32 kernel's, then rounded."""
    info = torch.finfo(F32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), info.max, -info.max, info.tiny / 8, -info.tiny / 3,
                            1.0, 1 + 2**-9, -(1 + 2**-9), 3e38, float("nan")])
    g = torch.cat([special * 10, torch.randn(100)])
    kw = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    wide = torch.zeros_like(g)
    kernel_step([torch.zeros_like(g)], [g.clone()], [wide], [torch.zeros_like(g)], [], [torch.tensor(0.0)], **kw)
    m = torch.zeros(g.numel(), dtype=BF16)
    kernel_step([torch.zeros_like(g)], [g.clone()], [m], [torch.zeros_like(m)], [], [torch.tensor(0.0)],
                    stochastic_rounding=True, tensor_ids=[3], seed=11, **kw)
    expected = bf16_stochastic(wide, sr_salt(11, 1, 3, 1))
    assert wide.isinf().sum() == 5
    keep = ~wide.isnan()
    assert torch.equal(bits(m)[keep], bits(expected)[keep])
    assert torch.equal(m.isnan(), wide.isnan())


# ---- every instantiated combination against the reference backend ----------------------------------------------


def _stored(params, opt):
    out = []
    for p in params:
        out.append(p.detach())
        out.extend(v for k, v in sorted(opt.state[p].items()) if k != "step")
    return out


def _assert_close(ours, ref, max_ulps):
    """fp32: assert_close's defaults. 16-bit stores: both backends round the same fp32 math once per store (with
    the same random bits where stochastic), so they differ only where a last-bit fp32 difference flips one."""
    for i, (x, y) in enumerate(zip(ours, ref)):
        assert x.dtype == y.dtype, i
        if x.element_size() == 2:
            d = ulp_distance(x, y)
            assert d.numel() == 0 or d.max().item() <= max_ulps, f"tensor {i}: {d.max().item()} ulps apart"
        else:
            torch.testing.assert_close(x, y, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("pdt, sdt, master", SUPPORTED, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("options", [dict(weight_decay=0.1, amsgrad=True, maximize=True), dict(weight_decay=0.0),
                                     dict(weight_decay=0.1, cls=FusedAdam, max_grad_norm=1e6)], ids=["everything", "no-wd", "L2+clip"])
def test_every_combination_matches_the_reference(pdt, sdt, master, sr, options):
    options = dict(options)
    cls = options.pop("cls", FusedAdamW)
    shapes = [(1,), (7,), (3, 5), (67,), (0,), (300,)]
    params0 = [torch.randn(s, dtype=torch.float64).to(pdt) for s in shapes]
    kw = dict(lr=0.01, master_weights=master, state_dtype=sdt, stochastic_rounding=sr, seed=5, **options)
    ours_p, ours = _train("cpu", params0, cls=cls, **kw)
    ref_p, ref = _train("reference", params0, cls=cls, **kw)
    assert {d.backend for d in ours.dispatch[0]} == {"cpu"}
    # max_grad_norm=1e6: the clip path with a coefficient of exactly 1. A real coefficient is not comparable with the
    # reference for bf16/fp16 grads: it multiplies in the grad's dtype (clip_grad_norm_'s in-place mul, a rounding),
    # the kernel in fp32 without storing the product.
    _assert_close(_stored(ours_p, ours), _stored(ref_p, ref), max_ulps=2)
    for p in ours_p:
        st = ours.state[p]
        assert st["exp_avg"].dtype == sdt
        if master:
            assert torch.equal(p.detach(), st["master_param"].to(pdt))


@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_feature_cases_match_the_reference(case):
    """The shared table of the options beyond torch (tests/parity.py): all run on the cpu kernel, within 2 ulps of the
    reference's 16-bit stores (the same fp32 math rounded once, with the same random bits where stochastic)."""
    dtype, kw = case
    params0 = [torch.randn(s, dtype=torch.float64).to(dtype) for s in [(1,), (7,), (3, 5), (67,), (0,), (300,)]]
    ours_p, ours = _train("cpu", params0, lr=0.01, **kw)
    ref_p, ref = _train("reference", params0, lr=0.01, **kw)
    assert {d.backend for d in ours.dispatch[0]} == {"cpu"}
    _assert_close(_stored(ours_p, ours), _stored(ref_p, ref), max_ulps=2)


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
@pytest.mark.parametrize("options", [dict(maximize=True, weight_decay=0.1), dict(weight_decay=0.0, amsgrad=True)],
                         ids=["maximize", "no-wd"])
def test_the_feature_loops_rewrites_are_exact(dtype, options):
    """The feature loop runs maximize as a multiply by -1 and no weight decay as decoupled decay by 1 (NOTE [cpu
    feature loops]): with a clip coefficient of exactly 1 it gives the torch-parity loop's bits."""
    params0 = [torch.randn(n, dtype=torch.float64).to(dtype) for n in (5, 67, 1000)]
    plain_p, plain = _train("cpu", params0, lr=0.01, **options)
    clip_p, clip = _train("cpu", params0, lr=0.01, max_grad_norm=1e6, **options)
    assert_bitwise(_stored(plain_p, plain), _stored(clip_p, clip))


def test_clipping_matches_the_reference_in_fp32():
    params0 = [torch.randn(n) for n in (5, 67, 1000)]
    kw = dict(lr=0.01, maximize=True, weight_decay=0.1, max_grad_norm=0.3)
    ours_p, ours = _train("cpu", params0, **kw)
    ref_p, ref = _train("reference", params0, **kw)
    _assert_close(_stored(ours_p, ours), _stored(ref_p, ref), max_ulps=0)


# ---- sizes, threads, ISAs, layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("pdt, sdt, master", [(BF16, BF16, False), (F32, BF16, False), (BF16, F32, True), (BF16, BF16, True)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_every_tail_size_with_stochastic_rounding_and_master(pdt, sdt, master):
    """Sizes 1..67 (every tail of a 16-wide vector, twice over): element j's bits depend on (seed, step, tensor id,
    j) only, so a tensor of n elements ends as the first n elements of the 67-element one with the same id."""
    p, g, m, v, vmax = _inputs(67, pdt, sdt)
    master_p = torch.randn(67)
    kw = dict(HP, weight_decay=0.1, amsgrad=True, maximize=True, decoupled=True)

    def run(n):
        ts = [t[:n].clone() for t in (p, g, m, v, vmax)]
        mp = master_p[:n].clone()
        extra = dict(master_params=[mp]) if master else {}
        for _ in range(2):
            kernel_step([ts[0]], [ts[1]], [ts[2]], [ts[3]], [ts[4]], [torch.tensor(0.0 + _)],
                            stochastic_rounding=True, tensor_ids=[9], seed=77, grad_scale=torch.tensor(2.0),
                            clip_coef=torch.tensor(0.75), **extra, **kw)
        return ts + ([mp] if master else [])

    full = run(67)
    for n in range(1, 67):
        assert_bitwise(run(n), [t[:n] for t in full])


@pytest.mark.parametrize("pdt, sdt, master", [(BF16, BF16, False), (F32, BF16, False), (BF16, F32, True)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_one_and_two_threads_give_the_samebits(pdt, sdt, master):
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(0, 300, (400,), generator=gen).tolist() + [100_003, 70_000]
    params0 = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
    kw = dict(lr=0.01, master_weights=master, state_dtype=sdt, stochastic_rounding=True, seed=3, amsgrad=True,
              max_grad_norm=1.0)
    with num_threads(1):
        one_p, one = _train("cpu", params0, steps=2, **kw)
    with num_threads(2):
        two_p, two = _train("cpu", params0, steps=2, **kw)
    assert_bitwise(_stored(one_p, one), _stored(two_p, two))


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_isa_gives_the_samebits(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    params0 = [torch.randn(n).to(dt) for dt in (F32, BF16, F16) for n in (1, 15, 17, 33, 67, 1000)]
    for sdt in (F32, BF16):
        kw = dict(lr=0.01, state_dtype=sdt, master_weights=True, stochastic_rounding=True, amsgrad=True, max_grad_norm=1.0)
        if sdt == BF16:
            params0_here = [p for p in params0 if p.dtype != F16]  # fp16 + master + bf16 states: declined
        else:
            params0_here = params0
        auto_p, auto = _train("cpu", params0_here, steps=2, **kw)
        with cpu_isa(isa):
            isa_p, isa_opt = _train("cpu", params0_here, steps=2, **kw)
        assert {d.backend for d in isa_opt.dispatch[0]} == {"cpu"}
        assert_bitwise(_stored(auto_p, auto), _stored(isa_p, isa_opt))


def test_non_contiguous_tensors_round_by_their_logical_index():
    """A transposed param and a channels_last one (walked in memory order they would draw other bits): equal to the
    reference, which rounds by row-major index, within an ulp where fp32 math differs in its last bit."""
    params0 = [torch.randn(7, 33).t().to(BF16), torch.randn(2, 3, 4, 5).to(BF16).to(memory_format=torch.channels_last)]

    def run(backend):
        params = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in params0]
        params[0] = params0[0].detach().clone().t().contiguous().t().requires_grad_()
        opt = FusedAdamW(params, backend=backend, lr=1e-3, stochastic_rounding=True, seed=8)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(BF16)
            opt.step()
        return params, opt

    ours_p, ours = run("cpu")
    ref_p, ref = run("reference")
    assert not ours_p[0].is_contiguous()
    assert ours_p[1].is_contiguous(memory_format=torch.channels_last)
    _assert_close(_stored(ours_p, ours), _stored(ref_p, ref), max_ulps=1)


def test_op_schema_takes_the_features():
    params0 = [torch.randn(n).to(BF16) for n in (1, 17, 1000)]

    def run(fn):
        ps = [p.clone() for p in params0]
        masters = [p.float() for p in ps]
        gs = [torch.full_like(p, 0.25) for p in ps]
        ms, vs = ([torch.zeros_like(p) for p in ps] for _ in range(2))
        steps = [torch.tensor(0.0) for _ in ps]
        fn(ps, gs, ms, vs, [], steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False,
           maximize=False, decoupled=True, master_params=masters, stochastic_rounding=True, tensor_ids=[4, 5, 6],
           seed=-1, clip_coef=torch.tensor(0.5))
        return ps + masters + ms + vs + steps

    assert_bitwise(run(kernel_step), run(op_step))


# ---- what the kernel declines ------------------------------------------------------------------------------------


def _reason(pdt, sdt, master=False, sr=False) -> str | None:
    group = group_of(pdt, state_dtype=sdt, master_weights=master, stochastic_rounding=sr)
    return BACKEND.supports(make_part([], [], [], [], [], PartOptions.of(group, pdt, clip=False)))


@pytest.mark.parametrize("pdt, sdt, master", DECLINED, ids=lambda x: str(x).replace("torch.", ""))
def test_declined_combinations_say_why_and_auto_falls_back(pdt, sdt, master):
    reason = _reason(pdt, sdt, master)
    assert reason is not None and "not instantiated" in reason and str(sdt).replace("torch.", "") in reason
    p = torch.randn(5).to(pdt).requires_grad_()
    opt = FusedAdam([p], state_dtype=sdt, master_weights=master)
    p.grad = torch.ones_like(p)
    opt.step()
    (d,) = opt.dispatch[0]
    assert d.backend == "reference" and "not instantiated" in d.skipped["cpu"]
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run"):
        q = torch.randn(5).to(pdt).requires_grad_()
        opt = FusedAdam([q], state_dtype=sdt, master_weights=master, backend="cpu")
        q.grad = torch.ones_like(q)
        opt.step()


def test_the_kernel_itself_refuses_a_declined_combination():
    p = torch.zeros(3, dtype=F64)
    with pytest.raises(TypeError, match="not instantiated for float64 params and bfloat16 states"):
        kernel_step([p], [torch.zeros_like(p)], [torch.zeros(3, dtype=BF16)], [torch.zeros(3, dtype=BF16)], [],
                        [torch.tensor(0.0)], weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, **HP)


def test_bad_feature_arguments():
    p = torch.zeros(3, dtype=BF16)
    base = dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, **HP)
    args = ([p], [torch.zeros_like(p)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.tensor(0.0)])
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] has dtype BFloat16, but exp_avgs\[0\] has dtype Float"):
        kernel_step(*args[:3], [torch.zeros(3, dtype=BF16)], *args[4:], **base)
    with pytest.raises(TypeError, match=r"master_params\[0\] has dtype BFloat16, expected float32"):
        kernel_step(*args, master_params=[p.clone()], **base)
    with pytest.raises(ValueError, match="master_params has 2 tensors, expected 1"):
        kernel_step(*args, master_params=[torch.zeros(3), torch.zeros(3)], **base)
    with pytest.raises(TypeError, match="master weights are for bfloat16 and float16 params"):
        q = torch.zeros(3)
        kernel_step([q], [q.clone()], [q.clone()], [q.clone()], [], [torch.tensor(0.0)], master_params=[q.clone()],
                    master=True, **base)
    with pytest.raises(ValueError, match="tensor_ids has 0 ids, expected 1"):
        kernel_step(*args, stochastic_rounding=True, **base)
    with pytest.raises(ValueError, match=r"clip_coef must have one element, got shape \[2\]"):
        kernel_step(*args, clip_coef=torch.ones(2), **base)
    with pytest.raises(ValueError, match="0 master_params with master=True"):
        kernel_step(*args, master=True, **base)


def test_the_op_has_a_fake_kernel_for_tracing():
    """torch.ops.fused_adam.adam_step_ under FakeTensorMode and on meta tensors: nothing computed, nothing raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = dict(weight_decay=0.0, wd_mode=0, amsgrad=False, maximize=False, **HP)
    with FakeTensorMode():
        p = torch.randn(4)
        torch.ops.fused_adam.adam_step_([p], [p.clone()], [p.clone()], [p.clone()], [], [torch.tensor(0.0)], **kw)
    p = torch.empty(4, device="meta", dtype=BF16)
    torch.ops.fused_adam.adam_step_([p], [p.clone()], [p.clone()], [p.clone()], [], [torch.tensor(0.0)],
                                    master_params=[torch.empty(4, device="meta")], sr_state=True,
                                    tensor_ids=[0], **kw)
