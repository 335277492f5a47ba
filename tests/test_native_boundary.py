"""The native boundary's entry points for other Python code (csrc/ops.cpp, csrc/common/tensor_pass.h):
_C.same_items (the step plan's identity compare) and _C.Partition.addresses (the check pass of step_ without the
step: every array's data address, for a backend that launches its own kernel)."""
from __future__ import annotations

import pytest
import torch
from conftest import requires_native

from fused_adam.backends import PartOptions

pytestmark = requires_native

PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MASTER = range(6)
ROWS_CHANGED = 0x3F
ALIGNED, FLAT = 1 << 6, 1 << 7


def _C():
    from fused_adam import _C

    return _C


# ---- same_items ---------------------------------------------------------------------------------------------------


def test_same_items_compares_identity():
    same_items = _C().same_items
    a = [torch.zeros(2) for _ in range(5)]
    assert same_items(a, list(a)) and same_items([], [])
    b = list(a)
    b[3] = a[3].clone()  # equal values, another object
    assert not same_items(a, b)
    b[3] = a[3]
    assert same_items(a, b)
    assert not same_items(a, a[:4]) and not same_items(a[:4], a)
    assert same_items(a, tuple(a))  # any list or tuple
    x, y = 10**20, 10**20  # equal ints, possibly two objects: identity, never ==
    assert same_items([x], [x])
    with pytest.raises(TypeError, match="same_items takes lists"):
        same_items(a, 3)


def test_same_items_at_ten_thousand():
    same_items = _C().same_items
    a = [torch.nn.Parameter(torch.zeros(1)) for _ in range(10_000)]
    b = list(a)
    assert same_items(a, b)
    b[9_999] = torch.nn.Parameter(torch.zeros(1))
    assert not same_items(a, b)


# ---- addresses ----------------------------------------------------------------------------------------------------


def _options(dtype=torch.float32, **group) -> PartOptions:
    base = dict(lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
                capturable=False, differentiable=False)
    base.update(group)
    return PartOptions.of(base, dtype, clip=False)


def _partition(n=4, numel=8, amsgrad=False, master=False, dtype=torch.float32):
    params = [torch.randn(numel).to(dtype) for _ in range(n)]
    sdt = torch.float32 if master else dtype
    for p in params:
        p.grad = torch.randn(numel).to(dtype)
    ms, vs = [torch.zeros(numel, dtype=sdt) for _ in params], [torch.zeros(numel, dtype=sdt) for _ in params]
    maxs = [torch.zeros(numel, dtype=sdt) for _ in params] if amsgrad else []
    masters = [p.float() for p in params] if master else []
    steps = [torch.tensor(0.0) for _ in params]
    opts = _options(dtype, amsgrad=amsgrad, master_weights=master)
    part = _C().Partition(params, ms, vs, maxs, steps, master_params=masters, options=opts)
    return part, dict(params=params, exp_avgs=ms, exp_avg_sqs=vs, max_exp_avg_sqs=maxs, masters=masters, steps=steps)


def _expected(lists, grads=None) -> torch.Tensor:
    n = len(lists["params"])
    grads = grads if grads is not None else [p.grad for p in lists["params"]]
    rows = [lists["params"], grads, lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"], lists["masters"]]
    return torch.tensor([[t.data_ptr() for t in row] if row else [0] * n for row in rows], dtype=torch.int64)


def test_addresses_rows_and_the_change_mask():
    part, lists = _partition(amsgrad=True)
    out = torch.zeros(6, 4, dtype=torch.int64)
    mask = part.addresses(None, out)[0]
    assert torch.equal(out, _expected(lists))
    # every row but the master's (0 before, 0 now) changed; torch's allocations are 64-byte aligned; all dense alike
    assert mask == (ROWS_CHANGED & ~(1 << MASTER)) | ALIGNED | FLAT
    assert part.addresses(None, out)[0] == ALIGNED | FLAT  # nothing moved
    # a grad replaced: only its row
    lists["params"][2].grad = torch.randn(8)
    assert part.addresses(None, out)[0] == (1 << GRAD) | ALIGNED | FLAT
    assert out[GRAD, 2] == lists["params"][2].grad.data_ptr()
    # `.data` replaced: the same Parameter, new memory
    lists["params"][1].data = torch.randn(8)
    assert part.addresses(None, out)[0] == (1 << PARAM) | ALIGNED | FLAT
    assert torch.equal(out, _expected(lists))
    # an exp_avg's .data assigned
    lists["exp_avgs"][3].data = torch.zeros(8)
    assert part.addresses(None, out)[0] == (1 << EXP_AVG) | ALIGNED | FLAT
    # grads given instead of read: their addresses
    given = [torch.randn(8) for _ in range(4)]
    assert part.addresses(given, out)[0] == (1 << GRAD) | ALIGNED | FLAT
    assert torch.equal(out, _expected(lists, given))
    # does not step: the step counts and values stay
    assert all(float(s) == 0.0 for s in lists["steps"]) and all(not m.any() for m in lists["exp_avgs"])


def test_addresses_of_masters():
    part, lists = _partition(master=True, dtype=torch.bfloat16)
    out = torch.zeros(6, 4, dtype=torch.int64)
    mask = part.addresses(None, out)[0]
    assert mask & (1 << MASTER) and not mask & (1 << MAX_EXP_AVG_SQ)
    assert torch.equal(out, _expected(lists))


def test_addresses_alignment_and_layout_bits():
    part, lists = _partition()
    out = torch.zeros(6, 4, dtype=torch.int64)
    lists["params"][0].grad = torch.randn(8, 2)[:, 0]  # strided: not the param's layout
    assert part.addresses(None, out)[0] & (ALIGNED | FLAT) == ALIGNED
    lists["params"][0].grad = torch.randn(9)[1:]  # dense, 4 bytes past an aligned allocation
    assert part.addresses(None, out)[0] & (ALIGNED | FLAT) == FLAT
    lists["params"][0].grad = torch.randn(8)
    assert part.addresses(None, out)[0] & (ALIGNED | FLAT) == ALIGNED | FLAT
    # transposed param with transposed states and grad: one dense layout shared, no copy needed
    p = torch.randn(3, 5).t()
    p.grad = torch.randn(3, 5).t()
    ms, vs = torch.zeros(3, 5).t(), torch.zeros(3, 5).t()
    part2 = _C().Partition([p], [ms], [vs], [], [torch.tensor(0.0)], options=_options())
    assert part2.addresses(None, torch.zeros(6, 1, dtype=torch.int64))[0] & FLAT
    p.grad = p.grad.contiguous()
    assert not part2.addresses(None, torch.zeros(6, 1, dtype=torch.int64))[0] & FLAT


def test_addresses_missing_grad_writes_nothing():
    part, lists = _partition()
    out = torch.zeros(6, 4, dtype=torch.int64)
    part.addresses(None, out)[0]
    before = out.clone()
    lists["params"][0].data = torch.randn(8)  # moved, but the pass will not finish
    lists["params"][3].grad = None
    assert part.addresses(None, out)[0] == -1
    assert torch.equal(out, before)


def test_addresses_errors_name_the_tensor_and_write_nothing():
    part, lists = _partition()
    out = torch.zeros(6, 4, dtype=torch.int64)
    part.addresses(None, out)[0]
    before = out.clone()
    lists["params"][1].data = torch.randn(8)
    lists["params"][2].grad.data = torch.randn(7)  # (assigning .grad itself checks the shape; .data does not)
    with pytest.raises(RuntimeError, match=r"grads\[2\] has shape \[7\], but params\[2\] has shape \[8\]"):
        part.addresses(None, out)[0]
    given = [torch.randn(8) for _ in range(4)]
    given[2] = torch.randn(8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype Double, but params\[2\] has dtype Float"):
        part.addresses(given, out)[0]
    lists["params"][2].grad = torch.randn(8).to_sparse()
    with pytest.raises(RuntimeError, match=r"grads\[2\] has layout Sparse"):
        part.addresses(None, out)[0]
    lists["params"][2].grad = torch.randn(8)
    lists["exp_avg_sqs"][3].data = torch.zeros(9)  # what `p.data = ...` on a state looks like
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[3\] has shape \[9\], but params\[3\] has shape \[8\]"):
        part.addresses(None, out)[0]
    with pytest.raises(ValueError, match="grads has 3 tensors, expected 4"):
        part.addresses([torch.randn(8)] * 3, out)
    assert torch.equal(out, before)
    with pytest.raises(ValueError, match=r"shape \(6, 4\), got shape \[6, 3\]"):
        part.addresses(None, torch.zeros(6, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="expected int64"):
        part.addresses(None, torch.zeros(6, 4, dtype=torch.int32))


def test_addresses_at_ten_thousand():
    """10,000 tensors: the pass runs in every thread (past 2048 tensors); the first bad tensor is the one named."""
    part, lists = _partition(n=10_000, numel=4)
    out = torch.zeros(6, 10_000, dtype=torch.int64)
    assert part.addresses(None, out)[0] & ROWS_CHANGED == 0xF
    assert torch.equal(out, _expected(lists))
    before = out.clone()
    held = [lists["params"][k].grad.data for k in (7_000, 9_000)]  # their memory is not handed to the new grads
    lists["params"][9_000].grad.data = torch.randn(5)
    lists["params"][7_000].grad.data = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"grads\[7000\] has shape \[3\]"):
        part.addresses(None, out)[0]
    assert torch.equal(out, before)
    lists["params"][7_000].grad = torch.randn(4)
    lists["params"][9_000].grad = torch.randn(4)
    assert part.addresses(None, out)[0] == (1 << GRAD) | ALIGNED | FLAT
    assert out[GRAD, 7_000] == lists["params"][7_000].grad.data_ptr() and torch.equal(out, _expected(lists))
    del held


def test_addresses_reads_only_metadata_on_any_device():
    """Meta tensors (no memory): the pass runs on whatever device the params are on, each array checked against it."""
    meta = [torch.empty(4, device="meta") for _ in range(3)]
    states = [[torch.empty(4, device="meta") for _ in meta] for _ in range(2)]
    part = _C().Partition(meta, *states, [], [torch.tensor(0.0) for _ in meta], options=_options())
    out = torch.ones(6, 3, dtype=torch.int64)
    grads = [torch.empty(4, device="meta") for _ in meta]
    assert part.addresses(grads, out)[0] == 0x3F | ALIGNED | FLAT  # every row was ones, is now the null address
    assert not out.any()
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu, expected meta"):
        part.addresses([grads[0], torch.empty(4), grads[2]], out)
    capturable = _C().Partition(meta, *states, [], [torch.tensor(0.0) for _ in meta], options=_options(capturable=True))
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must be a one-element float32 tensor on meta"):
        capturable.addresses(grads, out)
