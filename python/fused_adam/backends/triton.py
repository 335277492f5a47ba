"""Triton backend: one multi-tensor launch per (dtype combination, mode) through a device-side pointer table.

Computes the Adam/AdamW step of csrc/adam_math.h (Kingma & Ba, arXiv:1412.6980; Loshchilov & Hutter,
arXiv:1711.05101; AMSGrad: Reddi et al.) for every tensor of a partition in one launch: each program takes one
chunk of NOTE [chunk table] (csrc/chunk_table.h), reads its tensor's addresses from an int64 table on the device,
casts them to typed pointers and streams the chunk once (28 B/param for fp32, 14 B/param for bf16 with bf16
states). Math is fp32 for fp32/bf16/fp16 params; fp64 params are declined (the cuda and reference backends run
them).

The options beyond torch (FEATURES, backends/__init__.py), each a constexpr of one kernel, bitwise the reference
backend's stores for the same fp32 values:
  * state_dtype: each array has its own constexpr dtype (the launch groups tensors by dtype combination), e.g. fp32
    params with bf16 states (20 B/param) or bf16 params with fp32 states; fp64 states are declined;
  * master_weights (MASTER): the fp32 master (table row 7) is read instead of the param and written back, and the
    param gets it rounded to nearest (bf16 + fp32 master and states: 28 B/param);
  * stochastic_rounding (SR): bf16 stores that are the only copy of a value (params without a master, states)
    round with csrc/rounding.h's bits, NOTE [triton sr]; the salt needs each tensor's step, which capturable
    steps read on the device (scal's step row), so SR works with capturable;
  * clip (CLIP): the grad is multiplied by clip_coef, read from device memory in the kernel (no host sync),
    after unscaling (the stored grad stays unscaled and unclipped) and before maximize, as csrc/adam_math.h.

NOTE [triton table]: the table is one int64 device tensor, array-major so that one array's addresses are one
contiguous slice:
    rows 0..5 (each n_tensors long): addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step
    row 6: numels;  row 7: fp32 master addresses (0 without masters);  row 8: tensor ids (stochastic rounding)
    then chunk -> tensor index (n_chunks);  then chunk -> first element (n_chunks)
It is built once per partition and reused while the optimizer's lists and the params' addresses are unchanged
(NOTE [triton cache]); each step compares one data_ptr() per param and per grad and re-uploads only the grad row
when the grads moved (zero_grad(set_to_none=True) makes new grads every step). Per-tensor step scalars are either kernel
arguments (every tensor at the same step: the usual case, nothing uploaded) or a small fp32 device buffer:
    scal[0:4] = 1 - beta1, beta2, 1 - beta2, 1 - lr*wd;  scal[8 + 2t] = -lr/bc1(t);  scal[9 + 2t] = sqrt(bc2(t));
    scal[8 + 2T + t] = step(t) (stochastic rounding's salt)
filled on the host from each tensor's own step (mixed steps), or on the device by _capturable_step_kernel
(capturable=True: steps and lr stay on the device, so the step can be captured in a CUDA graph).

Tensors whose param/grad/states/master are not all dense with one set of strides (with stochastic rounding: not
all contiguous, NOTE [triton sr]) run on contiguous scratch copies that live in the cache (so the table stays
valid) and are copied back after the launch.
"""
from __future__ import annotations

import operator
import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from types import SimpleNamespace

from . import Amp, Backend, Hyper

NAME = "triton"
FEATURES = ("master_weights", "state_dtype", "stochastic_rounding", "clip")  # backends/__init__.py

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not importable: {type(e).__name__}: {e}"

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_P, _G, _M, _V, _X, _STEP, _NUMEL, _MASTER, _TID = range(9)  # table rows, NOTE [triton table]
_ROWS = 9  # then chunk -> tensor, chunk -> first element
_GROUP_SLOTS = 8  # scal[0:8]: group scalars; per-tensor pairs follow

# Launch geometry. GPU: 64K-element chunks (apex's size) streamed in 1024-element tiles by 4 warps, i.e. 8 fp32
# per thread = two 128-bit accesses per array. Interpreter: per-program cost dominates, so big tiles.
GPU_CHUNK, GPU_BLOCK, GPU_WARPS = 1 << 16, 1024, 4
# ptxas's own register target for the master-weight and stochastic-rounding variants is ~80, where it spills
# 4 bytes on sm_80 (tests/test_triton_ptx.py); for those variants only, a cap lets it allocate more without
# spilling. The other variants keep ptxas's choice (64-80 registers).
GPU_MAXNREG = 128
INTERPRET_CHUNK, INTERPRET_BLOCK = 1 << 16, 1 << 12
STEP_BLOCK = 128  # tensors per program of _capturable_step_kernel


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable() -> str | None:
    return _IMPORT_ERROR


def unsupported(device: torch.device, dtype: torch.dtype, hp: Hyper) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if hp.differentiable:
        return "differentiable=True: only the reference backend keeps autograd through the step"
    if dtype not in _SUPPORTED:
        return f"{dtype} params are not supported (fp32, bf16 and fp16 only; the cuda and reference backends run fp64)"
    if hp.state_dtype is not None and hp.state_dtype not in _SUPPORTED:
        return (f"state_dtype={hp.state_dtype} is not supported (fp32, bf16 and fp16 states only; the reference "
                "backend runs fp64 states)")
    if device.type == "cpu":
        if not _interpret():
            return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return None
    if device.type != "cuda":
        return f"device type {device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
    return None


# ---- kernels ---------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load(ptr, mask, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        else:
            return tl.load(ptr).to(tl.float32)

    @triton.jit
    def _round_bf16(x):
        # fp32 -> bf16, round to nearest even, in integer ops. The interpreter's own conversion truncates
        # (triton 3.9); the GPU's cvt.rn.bf16.f32 computes exactly this.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        half = (bits >> 16).to(tl.uint16)
        half = tl.where(x != x, 0x7FC0, half).to(tl.uint16)
        return half.to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _fmix32(h):
        # csrc/rounding.h's fmix32 on uint32 (multiplication wraps mod 2^32, compiled and interpreted).
        h ^= h >> 16
        h = h * tl.full([], 0x85EBCA6B, tl.uint32)
        h ^= h >> 13
        h = h * tl.full([], 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def _sr_keys(seed_key, step, tensor_id, start):
        # NOTE [triton sr]: csrc/rounding.h's sr_salt(seed, step, tensor id, stream) for the four streams (param,
        # exp_avg, exp_avg_sq, max_exp_avg_sq), once per program, each xor the chunk's constant part of sr_bits:
        # a chunk never crosses a multiple of 2^32 elements, so hi32(index) is the chunk start's and lo32(index) is
        # lo32(start) + offset. Per element there is then one fmix32(lo32(index) ^ key) per bf16 store.
        # The index is the element's row-major index (the reference's), so under SR only contiguous tensors run in
        # place; others run on contiguous scratch copies.
        salt_base = _fmix32(seed_key.to(tl.uint32, bitcast=True) ^ step.to(tl.uint32))
        tensor_id = tensor_id.to(tl.uint32)
        hi_mix = (start >> 32).to(tl.uint32) * tl.full([], 0x27D4EB2F, tl.uint32)
        key_p = _fmix32(salt_base ^ (tensor_id * 4 + 0)) ^ hi_mix
        key_m = _fmix32(salt_base ^ (tensor_id * 4 + 1)) ^ hi_mix
        key_v = _fmix32(salt_base ^ (tensor_id * 4 + 2)) ^ hi_mix
        key_x = _fmix32(salt_base ^ (tensor_id * 4 + 3)) ^ hi_mix
        return start.to(tl.uint32), key_p, key_m, key_v, key_x

    @triton.jit
    def _store(ptr, val, mask, MASKED: tl.constexpr, SOFT_BF16: tl.constexpr,
               SR: tl.constexpr = False, elem=None, key=None):
        # SR: bf16_bits_sr of csrc/rounding.h with the bits sr_bits(salt, index) = fmix32(elem ^ key) & 0xffff.
        if SR and ptr.dtype.element_ty == tl.bfloat16:
            bits = val.to(tl.uint32, bitcast=True)
            rand = _fmix32(elem ^ key) & 0xFFFF
            sr = ((bits + rand) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            if SOFT_BF16:
                near = _round_bf16(val)
            else:
                near = val.to(tl.bfloat16)
            val = tl.where((bits & 0x7F800000) == 0x7F800000, near, sr)  # inf and NaN: nothing to round
        elif SOFT_BF16 and ptr.dtype.element_ty == tl.bfloat16:
            val = _round_bf16(val)
        else:
            val = val.to(ptr.dtype.element_ty)
        if MASKED:
            tl.store(ptr, val, mask=mask)
        else:
            tl.store(ptr, val)

    @triton.jit
    def _tile(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, offs, mask, grad_scale, clip_coef,
              lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
              elem_base, key_p, key_m, key_v, key_x,
              WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr,
              MASKED: tl.constexpr, SOFT_BF16: tl.constexpr, MASTER: tl.constexpr, CLIP: tl.constexpr,
              SR: tl.constexpr):
        # Same order of operations as fused_adam::adam_update (csrc/adam_math.h), in fp32 with IEEE div and sqrt;
        # launched with FP contraction off, so the three tl.fma (ATen's add-with-alpha, lerp, addcmul) are the only
        # fused multiply-adds.
        elem = elem_base
        if SR:
            elem = elem_base + offs.to(tl.uint32)  # lo32 of the element index
        g = _load(g_ptr + offs, mask, MASKED)
        if UNSCALE:
            g = tl.div_rn(g, grad_scale)
            _store(g_ptr + offs, g, mask, MASKED, SOFT_BF16)
        if CLIP:
            g = g * clip_coef  # for the update only: the stored grad stays unclipped
        if MAXIMIZE:
            g = -g
        if MASTER:
            p = _load(w_ptr + offs, mask, MASKED)
        else:
            p = _load(p_ptr + offs, mask, MASKED)
        if WD_MODE == 2:
            p = p * decay
        if WD_MODE == 1:
            g = tl.fma(weight_decay, p, g)  # grad.add(param, alpha=wd)
        m = _load(m_ptr + offs, mask, MASKED)
        m = tl.fma(lerp_coeff, g - m, tl.where(lerp_small, m, g))  # at::lerp, one fma
        v = _load(v_ptr + offs, mask, MASKED)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = v
        if AMSGRAD:
            x = _load(x_ptr + offs, mask, MASKED)
            x = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
            _store(x_ptr + offs, x, mask, MASKED, SOFT_BF16, SR, elem, key_x)
            second = x
        denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        _store(m_ptr + offs, m, mask, MASKED, SOFT_BF16, SR, elem, key_m)
        _store(v_ptr + offs, v, mask, MASKED, SOFT_BF16, SR, elem, key_v)
        if MASTER:
            _store(w_ptr + offs, p, mask, MASKED, SOFT_BF16)
            _store(p_ptr + offs, p, mask, MASKED, SOFT_BF16)  # the master rounded to nearest
        else:
            _store(p_ptr + offs, p, mask, MASKED, SOFT_BF16, SR, elem, key_p)

    @triton.jit(do_not_specialize=["n_tensors", "n_chunks", "sr_seed_key"])  # one compile whatever their values
    def _adam_kernel(
        table, n_tensors, n_chunks, scal, grad_scale_ptr, found_inf_ptr, clip_coef_ptr,
        neg_step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, decay, eps, weight_decay,
        sr_seed_key,  # int32 bits of sr_salt's seed part (host): fmix32(lo32(seed) ^ fmix32(hi32(seed) + 0x9e3779b9))
        sr_step,  # fp32: the step every tensor is at (used unless DEVICE_SCALARS: then scal's step row)
        P_TY: tl.constexpr, G_TY: tl.constexpr, M_TY: tl.constexpr, V_TY: tl.constexpr, X_TY: tl.constexpr,
        WD_MODE: tl.constexpr,  # 0 none, 1 L2 (Adam), 2 decoupled (AdamW): fused_adam::WeightDecay
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        DEVICE_SCALARS: tl.constexpr,  # step scalars from `scal` (per tensor) instead of the arguments
        ALIGNED: tl.constexpr,  # every address of the launch is 16-byte aligned: 128-bit accesses
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
        SOFT_BF16: tl.constexpr,  # interpreter: round fp32 -> bf16 by hand (see _round_bf16)
        MASTER: tl.constexpr = False,  # the fp32 master (table row 7) is read and written; the param is its rounding
        CLIP: tl.constexpr = False,  # grad * clip_coef (a device scalar) for the update
        SR: tl.constexpr = False,  # bf16 stores that are the only copy of a value round stochastically
    ):
        if HAS_FOUND_INF:
            if tl.load(found_inf_ptr) != 0:
                return
        pid = tl.program_id(0)
        t = tl.load(table + 9 * n_tensors + pid)
        start = tl.load(table + 9 * n_tensors + n_chunks + pid)  # int64: tensors of 2^31 elements and more
        n = tl.minimum(tl.load(table + 6 * n_tensors + t) - start, CHUNK).to(tl.int32)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
        p_ptr = tl.load(table + t).to(tl.pointer_type(P_TY)) + start
        g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(G_TY)) + start
        m_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(M_TY)) + start
        v_ptr = tl.load(table + 3 * n_tensors + t).to(tl.pointer_type(V_TY)) + start
        x_ptr = tl.load(table + 4 * n_tensors + t).to(tl.pointer_type(X_TY)) + start
        w_ptr = p_ptr
        if MASTER:
            w_ptr = tl.load(table + 7 * n_tensors + t).to(tl.pointer_type(tl.float32)) + start
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            x_ptr = tl.multiple_of(x_ptr, 16)
            w_ptr = tl.multiple_of(w_ptr, 16)
        if DEVICE_SCALARS:
            one_minus_beta1 = tl.load(scal)
            beta2 = tl.load(scal + 1)
            one_minus_beta2 = tl.load(scal + 2)
            decay = tl.load(scal + 3)
            neg_step_size = tl.load(scal + 8 + 2 * t)
            bc2_sqrt = tl.load(scal + 9 + 2 * t)
        # make_step_scalars' choice between at::lerp's two forms, on the fp32 value of 1 - beta1.
        lerp_small = (one_minus_beta1 < 0.5) & (one_minus_beta1 > -0.5)
        lerp_coeff = tl.where(lerp_small, one_minus_beta1, one_minus_beta1 - 1.0)
        grad_scale = 1.0
        if UNSCALE:
            grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
        clip_coef = 1.0
        if CLIP:
            clip_coef = tl.load(clip_coef_ptr).to(tl.float32)
        elem_base = tl.full([], 0, tl.uint32)
        key_p = elem_base
        key_m = elem_base
        key_v = elem_base
        key_x = elem_base
        if SR:
            if DEVICE_SCALARS:
                step_now = tl.load(scal + 8 + 2 * n_tensors + t)
            else:
                step_now = sr_step
            elem_base, key_p, key_m, key_v, key_x = _sr_keys(sr_seed_key, step_now, tl.load(table + 8 * n_tensors + t), start)
        n_full = n // BLOCK * BLOCK
        for off in tl.range(0, n_full, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(off + tl.arange(0, BLOCK), BLOCK), BLOCK)
            _tile(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, offs, None, grad_scale, clip_coef,
                  lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
                  elem_base, key_p, key_m, key_v, key_x,
                  WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, False, SOFT_BF16, MASTER, CLIP, SR)
        if n_full < n:
            offs = n_full + tl.arange(0, BLOCK)
            _tile(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, offs, offs < n, grad_scale, clip_coef,
                  lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
                  elem_base, key_p, key_m, key_v, key_x,
                  WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, True, SOFT_BF16, MASTER, CLIP, SR)

    @triton.jit
    def _pow_int(base, e):
        # base ** e for whole-number e < 2^32 by squaring, in the dtype of base (fp64 here): the same on the
        # GPU and in the interpreter, which has no libdevice pow. Relative error ~ log2(e) ulps.
        result = tl.full(base.shape, 1.0, base.dtype)
        for _ in tl.static_range(32):
            result = tl.where((e & 1) != 0, result * base, result)
            base = base * base
            e = e >> 1
        return result

    @triton.jit
    def _capturable_step_kernel(
        table, n_tensors, scal, found_inf_ptr, lr_ptr, beta1_ptr, beta2_ptr, weight_decay_ptr,
        HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # step += 1 (- found_inf, as torch's fused step), then each tensor's bias corrections from its own
        # step, in fp64 as make_step_scalars, rounded once to fp32 into scal (NOTE [triton table]).
        pid = tl.program_id(0)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n_tensors
        step_ptrs = tl.load(table + 5 * n_tensors + idx, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptrs, mask=mask, other=0.0)
        inc = 1.0
        if HAS_FOUND_INF:
            inc = 1.0 - (tl.load(found_inf_ptr).to(tl.float32) != 0).to(tl.float32)
        step = step + inc
        tl.store(step_ptrs, step, mask=mask)
        lr = tl.load(lr_ptr).to(tl.float64)
        beta1 = tl.load(beta1_ptr).to(tl.float64)
        beta2 = tl.load(beta2_ptr).to(tl.float64)
        e = tl.maximum(step, 1.0).to(tl.int64)  # step 0 only when found_inf skips the update
        bc1 = 1.0 - _pow_int(tl.full([BLOCK], 0.0, tl.float64) + beta1, e)
        bc2 = 1.0 - _pow_int(tl.full([BLOCK], 0.0, tl.float64) + beta2, e)
        tl.store(scal + 8 + 2 * idx, (-(lr / bc1)).to(tl.float32), mask=mask)
        tl.store(scal + 9 + 2 * idx, tl.sqrt(bc2).to(tl.float32), mask=mask)
        tl.store(scal + 8 + 2 * n_tensors + idx, step, mask=mask)  # stochastic rounding's salt (NOTE [triton sr])
        if pid == 0:
            tl.store(scal, (1.0 - beta1).to(tl.float32))
            tl.store(scal + 1, beta2.to(tl.float32))
            tl.store(scal + 2, (1.0 - beta2).to(tl.float32))
            tl.store(scal + 3, (1.0 - lr * tl.load(weight_decay_ptr).to(tl.float64)).to(tl.float32))


_TL_DTYPE = {}
if tl is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ---- host side -------------------------------------------------------------------------------------------------


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel*itemsize) in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _geometry(device: torch.device) -> tuple[int, int, int]:
    if device.type == "cpu":
        return INTERPRET_CHUNK, INTERPRET_BLOCK, 1
    return GPU_CHUNK, GPU_BLOCK, GPU_WARPS


def _compile_options(device: torch.device, master: bool, sr: bool) -> dict:
    """Launch options beyond the geometry: see GPU_MAXNREG."""
    return {"maxnreg": GPU_MAXNREG} if device.type != "cpu" and (master or sr) else {}


def _upload(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _check_not_capturing(device: torch.device, what: str) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"FusedAdam (triton backend): {what} changed during CUDA graph capture; run one eager step with the "
            "same tensors before capturing, and keep them (static grads) while the graph is replayed"
        )


@dataclass
class _Launch:
    """One (dtype combination) launch of a partition: its tensors, table and scratch copies."""

    index: list[int]  # positions in the partition's lists
    dtypes: tuple  # torch dtypes of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (and master's, if any)
    table: Tensor  # NOTE [triton table], on the device
    n_chunks: int
    aligned: bool
    grad_ptrs: list[int]  # the grad row as uploaded
    grad_strides: list[tuple]  # the strides a grad must have to be used in place (its param's)
    everything: bool  # index is every position, in order
    grads_aligned: bool = False  # every address in the uploaded grad row is 16-byte aligned
    scratch: dict[int, list[Tensor]] = field(default_factory=dict)  # position -> contiguous p, g, m, v, x, w copies
    scal: Tensor | None = None  # capturable: device buffer written by _capturable_step_kernel


@dataclass
class _Entry:
    step0: weakref.ref  # the partition's first step tensor: the entry dies with it (with the optimizer's state)
    steps_id: int  # id() of the state_steps list (not held: holding it would keep step0 alive)
    lists: tuple  # params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters: held, so identity checks are sound
    param_ptrs: list[int]
    step_ptrs: list[int]  # capturable: the step row of the table
    chunk: int
    amsgrad: bool
    capturable: bool
    launches: list[_Launch]
    tensor_ids: list[int] | None  # stochastic rounding: the table's tensor id row (NOTE [triton sr])
    hyper_key: tuple | None = None  # capturable: values in hyper_dev
    hyper_dev: Tensor | None = None
    host_steps: tuple | None = None  # not capturable: (the steps' addresses, _step_buffers of them)


# NOTE [triton cache]: keyed by id() of the partition's first step tensor. An entry is used while it is handed
# the same params and state tensors (the same list objects, as the optimizer's step plan does: NOTE [step plan]
# in optimizer.py; or new lists of the same tensors, one identity check each) and the params still have the
# addresses in the table (a param's storage can be swapped under the optimizer, e.g. `p.data = ...`); the grads
# are checked by _grads_for. Per step that is one data_ptr() per param and per grad. The entry holds no step
# tensor, so it dies with the optimizer's state.
_cache: dict[int, _Entry] = {}


def _drop_dead(key: int) -> None:
    entry = _cache.get(key)
    if entry is not None and entry.step0() is None:
        del _cache[key]


def _build(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp: Hyper, masters, tensor_ids) -> _Entry:
    device = params[0].device
    n = len(params)
    chunk, _, _ = _geometry(device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if grads[i].dtype != p.dtype:
            raise RuntimeError(f"FusedAdam (triton backend): grad of param {i} is {grads[i].dtype}, param is {p.dtype}")
        x = max_exp_avg_sqs[i] if hp.amsgrad else exp_avg_sqs[i]
        if masters and masters[i].dtype != torch.float32:
            raise RuntimeError(f"FusedAdam (triton backend): master of param {i} is {masters[i].dtype}, expected float32")
        groups.setdefault((p.dtype, grads[i].dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype, x.dtype), []).append(i)
    launches = []
    for dtypes, index in groups.items():
        T = len(index)
        rows = [[0] * T for _ in range(_ROWS)]
        numels = [0] * T
        scratch: dict[int, list[Tensor]] = {}
        grad_strides = []
        for j, i in enumerate(index):
            p = params[i]
            arrays = [p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if hp.amsgrad else exp_avg_sqs[i]]
            if masters:
                arrays.append(masters[i])
            fixed = [arrays[0]] + arrays[2:]
            # Stochastic rounding draws by row-major index (NOTE [triton sr]): memory order must be that order.
            layout_ok = p.is_contiguous() if hp.stochastic_rounding else _dense(p)
            in_place = layout_ok and all(a.stride() == p.stride() for a in fixed)
            grad_strides.append(p.stride() if in_place else None)
            if not in_place:
                scratch[j] = [torch.empty(p.shape, dtype=a.dtype, device=device) for a in arrays]
                arrays = scratch[j]
            for r in range(5):
                rows[r][j] = arrays[r].data_ptr()
            rows[_STEP][j] = state_steps[i].data_ptr() if hp.capturable else 0
            rows[_MASTER][j] = arrays[5].data_ptr() if masters else 0
            rows[_TID][j] = tensor_ids[i] if tensor_ids else 0
            numels[j] = p.numel()
        nums = torch.tensor(numels, dtype=torch.int64)
        per = (nums + chunk - 1) // chunk
        chunk_tensor = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), per)
        first = torch.cumsum(per, 0) - per
        chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first[chunk_tensor]) * chunk
        rows[_NUMEL] = numels
        host = torch.cat([torch.tensor(rows, dtype=torch.int64).reshape(-1), chunk_tensor, chunk_start])
        # The grad row is rechecked every step: alignment of everything else is fixed, grads are checked then.
        aligned = all(a % 16 == 0 for r in (_P, _M, _V, _X, _MASTER) for a in rows[r])
        launch = _Launch(index, dtypes, _upload(host, device), int(chunk_tensor.numel()), aligned,
                         rows[_G], grad_strides, index == list(range(n)),
                         grads_aligned=all(a % 16 == 0 for a in rows[_G]), scratch=scratch)
        if hp.capturable:
            launch.scal = torch.zeros(_GROUP_SLOTS + 3 * T, dtype=torch.float32, device=device)
        launches.append(launch)
    key = id(state_steps[0])
    entry = _Entry(
        weakref.ref(state_steps[0], lambda _, key=key: _drop_dead(key)), id(state_steps),
        (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters), list(map(Tensor.data_ptr, params)),
        list(map(Tensor.data_ptr, state_steps)) if hp.capturable else [], chunk, hp.amsgrad,
        hp.capturable, launches, list(tensor_ids) if tensor_ids else None,
    )
    _cache[key] = entry
    return entry


def _same(a: list, b: list) -> bool:
    return a is b or (len(a) == len(b) and all(map(operator.is_, a, b)))


def _entry(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp: Hyper, masters, tensor_ids) -> _Entry:
    lists = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters)
    entry = _cache.get(id(state_steps[0]))
    if (
        entry is None
        or entry.step0() is not state_steps[0]
        or not all(map(_same, entry.lists, lists))  # the same tensors (new lists of them are fine: direct callers)
        or (entry.steps_id != id(state_steps) and hp.capturable
            and entry.step_ptrs != list(map(Tensor.data_ptr, state_steps)))
        or entry.chunk != _geometry(params[0].device)[0]
        or entry.amsgrad != hp.amsgrad
        or entry.capturable != hp.capturable
        or entry.param_ptrs != list(map(Tensor.data_ptr, params))
        or entry.tensor_ids != (list(tensor_ids) if tensor_ids else None)  # also: SR on or off (in-place rule)
    ):
        _check_not_capturing(params[0].device, "the params or optimizer states")
        return _build(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, masters, tensor_ids)
    entry.lists, entry.steps_id = lists, id(state_steps)
    return entry


# NOTE [host steps]: without capturable, the step counts are 0-dim float32 CPU tensors, one per param, which the
# optimizer makes as views into a few shared buffers (NOTE [packed states] in optimizer.py). Read and incremented
# one tensor at a time they cost ~0.45 us each (4.4 ms of a 10k-tensor step); per buffer, one gather and one
# scatter do the same (~0.5 ms in all), with the same fp32 addition. Keyed by the steps' addresses, so a step
# tensor replaced or moved (load_state_dict, `.data = ...`) is seen; separate tensors take the per-tensor path.
def _count_host_steps(entry: _Entry, state_steps: list[Tensor]) -> list[float]:
    """Each step count before this step, as floats; the counts incremented in place."""
    ptrs = list(map(Tensor.data_ptr, state_steps))
    if entry.host_steps is None or entry.host_steps[0] != ptrs:
        entry.host_steps = (ptrs, _step_buffers(state_steps, ptrs))
    buffers = entry.host_steps[1]
    if buffers is None:
        steps = list(map(float, state_steps))
        torch._foreach_add_(state_steps, [_ONE] * len(state_steps))
        return steps
    before = torch.empty(len(state_steps), dtype=torch.float32)
    for base, offsets, positions in buffers:
        old = base[offsets]
        base[offsets] = old + _ONE
        before[positions] = old
    return before.tolist()


def _step_buffers(state_steps: list[Tensor], ptrs: list[int]) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Per storage the step tensors view: (the storage as a float32 vector, their element offsets in it, their
    positions in the list); None where they are mostly separate tensors, or anything is unusual."""
    by_storage: dict[int, tuple[torch.UntypedStorage, list[int]]] = {}
    for j, s in enumerate(state_steps):
        if s.dtype != torch.float32 or s.device.type != "cpu" or s.numel() != 1:
            return None
        storage = s.untyped_storage()
        by_storage.setdefault(storage.data_ptr(), (storage, []))[1].append(j)
    if 32 * len(by_storage) > len(state_steps):  # ~15 us a buffer against ~0.45 us a tensor
        return None
    buffers = []
    for start, (storage, positions) in by_storage.items():
        offsets = [ptrs[j] - start for j in positions]
        if any(o % 4 for o in offsets) or len(set(offsets)) != len(offsets):
            return None
        base = torch.empty(0, dtype=torch.float32).set_(storage, 0, (storage.nbytes() // 4,), (1,))
        buffers.append((base, torch.tensor([o // 4 for o in offsets]), torch.tensor(positions)))
    return buffers


def _float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _host_scalars(hp: Hyper, step: float) -> tuple[float, float]:
    """make_step_scalars' step-dependent pair, in double: (-lr / (1 - beta1^t), (1 - beta2^t) ** 0.5)."""
    lr, beta1, beta2 = _float(hp.lr), _float(hp.beta1), _float(hp.beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return -(lr / bias_correction1), bias_correction2**0.5


def _sr_seed_key(seed: int) -> int:
    """sr_salt's seed part (csrc/rounding.h), as the int32 with its bits: the kernel finishes the salt."""

    def fmix32(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    h = fmix32((seed & 0xFFFFFFFF) ^ fmix32(((seed >> 32) + 0x9E3779B9) & 0xFFFFFFFF))
    return h - (1 << 32) if h >= 1 << 31 else h  # always an i32 argument: one compile


def _wd_mode(hp: Hyper) -> int:
    if hp.weight_decay == 0:
        return 0
    return 2 if hp.decoupled else 1


def _grads_for(launch: _Launch, grads: list[Tensor], params: list[Tensor], device) -> tuple[list[Tensor], list]:
    """The grads a launch reads: each in place when its strides are its param's, else a copy (copied back after
    unscaling). Uploads the grad row when addresses changed. Returns (grads in launch order, copies to write back)."""
    gs = grads if launch.everything else [grads[i] for i in launch.index]
    strides = list(map(Tensor.stride, gs))
    copies = []
    if strides != launch.grad_strides:
        gs = list(gs)
        for j, (g, want) in enumerate(zip(gs, launch.grad_strides)):
            if want is not None and g.stride() != want:
                p = params[launch.index[j]]
                c = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g)
                copies.append((g, c))
                gs[j] = c
    ptrs = list(map(Tensor.data_ptr, gs))
    for j in launch.scratch:
        ptrs[j] = launch.scratch[j][1].data_ptr()
    if ptrs != launch.grad_ptrs:
        _check_not_capturing(device, "the grads' addresses")
        T = len(launch.index)
        host = torch.tensor(ptrs, dtype=torch.int64)
        launch.table[_G * T:(_G + 1) * T].copy_(host if device.type == "cpu" else host.pin_memory(), non_blocking=True)
        launch.grad_ptrs = ptrs
        launch.grads_aligned = all(a % 16 == 0 for a in ptrs)
    return gs, copies


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    master_params: list[Tensor] | None = None,
    tensor_ids: list[int] | None = None,
    clip_coef: Tensor | None = None,
) -> None:
    if not params:
        return
    device = params[0].device
    if not hp.capturable and found_inf is not None and bool(found_inf.item()):
        return  # the steps live on the host: reading found_inf there is the only way to leave them unchanged
    masters = master_params if hp.master_weights and master_params else []
    if hp.stochastic_rounding and (tensor_ids is None or len(tensor_ids) != len(params)):
        raise RuntimeError("FusedAdam (triton backend): stochastic_rounding needs tensor_ids, one per param")
    ids = tensor_ids if hp.stochastic_rounding else None
    entry = _entry(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, masters, ids)
    chunk, block, warps = _geometry(device)
    wd_mode = _wd_mode(hp)
    dummy = entry.launches[0].table

    if hp.capturable:
        # lr and betas: read where they live (a device tensor, e.g. a scheduler's), else from a cached fp64 copy.
        values = [None if isinstance(x, Tensor) and x.device == device else _float(x) for x in (hp.lr, hp.beta1, hp.beta2)]
        key = (*values, float(hp.weight_decay))
        if entry.hyper_key != key:
            _check_not_capturing(device, "a float lr or beta")
            host = [0.0 if v is None else v for v in values] + [float(hp.weight_decay)]
            entry.hyper_dev = _upload(torch.tensor(host, dtype=torch.float64), device)
            entry.hyper_key = key
        ptrs = [x if v is None else entry.hyper_dev[k:k + 1] for k, (x, v) in enumerate(zip((hp.lr, hp.beta1, hp.beta2), values))]
        for launch in entry.launches:
            T = len(launch.index)
            _capturable_step_kernel[(triton.cdiv(T, STEP_BLOCK),)](
                launch.table, T, launch.scal, found_inf if found_inf is not None else dummy, *ptrs,
                entry.hyper_dev[3:4], HAS_FOUND_INF=found_inf is not None, BLOCK=STEP_BLOCK, enable_fp_fusion=False,
            )
        uniform = None
        sr_step = 0.0
    else:
        steps = _count_host_steps(entry, state_steps)
        sr_step = steps[0] + 1.0
        if len(set(steps)) == 1:
            uniform = _host_scalars(hp, steps[0] + 1.0)
        else:
            uniform = None
            pairs = {s: _host_scalars(hp, s + 1.0) for s in set(steps)}
        lr, beta1, beta2 = _float(hp.lr), _float(hp.beta1), _float(hp.beta2)
        group = [1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * hp.weight_decay]
    sr_seed_key = _sr_seed_key(hp.seed) if hp.stochastic_rounding else 0
    if clip_coef is not None:
        clip_coef = clip_coef.to(device=device, dtype=torch.float32)

    for launch in entry.launches:
        if launch.n_chunks == 0:
            continue
        T = len(launch.index)
        gs, copies = _grads_for(launch, grads, params, device)
        for j, bufs in launch.scratch.items():
            i = launch.index[j]
            srcs = [params[i], gs[j], exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if hp.amsgrad else [])
            dsts = bufs[: len(srcs)]
            if masters:
                srcs.append(masters[i])
                dsts = dsts + [bufs[5]]
            torch._foreach_copy_(dsts, srcs)
        aligned = launch.aligned and launch.grads_aligned
        if hp.capturable:
            scal, args = launch.scal, (1.0,) * 6
        elif uniform is not None:
            scal, args = dummy, (uniform[0], uniform[1], *group)
        else:
            host = [*group, 0.0, 0.0, 0.0, 0.0]
            for i in launch.index:
                host.extend(pairs[steps[i]])
            host.extend(steps[i] + 1.0 for i in launch.index)  # NOTE [triton sr]
            scal, args = _upload(torch.tensor(host, dtype=torch.float32), device), (1.0,) * 6
        _adam_kernel[(launch.n_chunks,)](
            launch.table, T, launch.n_chunks, scal,
            grad_scale if grad_scale is not None else dummy,
            found_inf if (found_inf is not None and hp.capturable) else dummy,
            clip_coef if clip_coef is not None else dummy,
            *args, float(hp.eps), float(hp.weight_decay), sr_seed_key, sr_step,
            P_TY=_TL_DTYPE[launch.dtypes[0]], G_TY=_TL_DTYPE[launch.dtypes[1]], M_TY=_TL_DTYPE[launch.dtypes[2]],
            V_TY=_TL_DTYPE[launch.dtypes[3]], X_TY=_TL_DTYPE[launch.dtypes[4]],
            WD_MODE=wd_mode, AMSGRAD=hp.amsgrad, MAXIMIZE=hp.maximize, UNSCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None and hp.capturable, DEVICE_SCALARS=scal is not dummy,
            ALIGNED=aligned, CHUNK=chunk, BLOCK=block, SOFT_BF16=device.type == "cpu",
            MASTER=bool(masters), CLIP=clip_coef is not None, SR=hp.stochastic_rounding,
            num_warps=warps, enable_fp_fusion=False, **_compile_options(device, bool(masters), hp.stochastic_rounding),
        )
        for j, bufs in launch.scratch.items():
            i = launch.index[j]
            dsts = [params[i], exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if hp.amsgrad else [])
            srcs = [bufs[0], bufs[2], bufs[3]] + ([bufs[4]] if hp.amsgrad else [])
            if masters:
                dsts.append(masters[i])
                srcs.append(bufs[5])
            if grad_scale is not None:
                dsts.append(gs[j])
                srcs.append(bufs[1])
            torch._foreach_copy_(dsts, srcs)
        if grad_scale is not None:
            for g, c in copies:
                g.copy_(c)


_ONE = torch.ones(())


def _legacy_hyper(part, hp: Hyper) -> SimpleNamespace:
    """Interim: the old per-call options object this module's step() reads."""
    o = part.options
    return SimpleNamespace(lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay,
                           amsgrad=o.amsgrad, maximize=o.maximize, decoupled=o.decoupled, capturable=o.capturable,
                           differentiable=o.differentiable, master_weights=o.master,
                           state_dtype=None if o.state_dtype == o.param_dtype else o.state_dtype,
                           stochastic_rounding=o.stochastic_rounding, seed=o.seed, clip=o.clip)


class _Adapter(Backend):
    name = 'triton'

    def unavailable(self) -> str | None:
        return unavailable()

    def supports(self, part) -> str | None:
        return unsupported(part.device, part.dtype, _legacy_hyper(part, Hyper(0.0, 0.0, 0.0, 0.0, 0.0)))

    def step(self, part, grads, hp: Hyper, amp: Amp) -> bool:
        if grads is None:
            grads = part.grads_from_params()
            if grads is None:
                return False
        extra = {}
        if part.options.master:
            extra["master_params"] = part.master_params
        if part.options.stochastic_rounding:
            extra["tensor_ids"] = part.tensor_ids
        step(part.params, grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps,
             _legacy_hyper(part, hp), amp.grad_scale, amp.found_inf, clip_coef=amp.clip_coef, **extra)
        return True


BACKEND = _Adapter()
