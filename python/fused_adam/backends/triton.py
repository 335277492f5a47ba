"""Triton backend: one launch per step per partition, over a device-resident pointer table.

Computes the Adam/AdamW step of csrc/adam_math.h (Kingma & Ba, arXiv:1412.6980; Loshchilov & Hutter,
arXiv:1711.05101; AMSGrad: Reddi et al.) for every tensor of a partition in one launch. The chunks of NOTE [chunk
table] (csrc/chunk_table.h) are one list; a grid sized to the device (at most PROGRAMS_PER_SM persistent programs
per SM) strides it, each chunk streamed once (28 B/param for fp32, 14 B/param for bf16 with bf16 states) with
128-bit accesses where its addresses are 16-byte aligned (a launch whose addresses all are compiles without the
per-chunk test) and a masked tail tile. Math is fp32 for fp32/bf16/fp16 params and fp64 for fp64 params (opmath, as
csrc/adam_math.h).

The options beyond torch (PartOptions), each a constexpr of one kernel, bitwise the reference backend's stores for
the same fp32 values:
  * state_dtype: the states' own constexpr dtype, e.g. fp32 params with bf16 states (20 B/param), bf16 params with
    fp32 states, fp32 params with fp64 states;
  * master (MASTER): the fp32 master (address row 5) is read instead of the param and written back, and the param
    gets it rounded to nearest;
  * stochastic rounding (SR): bf16 stores that are the only copy of a value (part.options.sr_param / sr_state)
    round with csrc/rounding.h's bits, NOTE [triton sr]; the salt needs each tensor's step, which capturable steps
    read on the device, so SR works with capturable;
  * clip (CLIP): the grad is multiplied by clip_coef, read from device memory in the kernel (no host sync), after
    unscaling (the stored grad stays unscaled and unclipped) and before maximize, as csrc/adam_math.h.

NOTE [triton table]: one int64 device tensor per partition, built once (prepare), array-major so that a row is one
contiguous slice:
    rows 0..5 (T each): addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, fp32 master (0: none)
    row 6: step addresses (capturable);  row 7: numels;  row 8: tensor ids (stochastic rounding)
    then chunk -> tensor index (n_chunks);  then chunk -> first element (n_chunks)
Rows 0..5 are exactly what the native check pass writes (NOTE [triton host path]), so a step uploads the rows that
changed as they are. Step scalars are kernel arguments (every tensor at the same step, fp32 math: nothing uploaded)
or a small device buffer `scal` in the math dtype (SCALARS):
    scal[0:8] = 1 - beta1, beta2, 1 - beta2, 1 - lr*wd, eps, wd, -lr/bc1, sqrt(bc2)   (the last two: uniform step)
    scal[8 + 2t] = -lr/bc1(t);  scal[9 + 2t] = sqrt(bc2(t));  scal[8 + 2T + t] = step(t)   (per tensor)
filled on the host (fp64 math, whose scalars a kernel argument cannot carry; mixed steps) or on the device by
_capturable_step_kernel (capturable=True: steps and lr stay on the device, so the step can be captured in a graph).
"""
from __future__ import annotations

import itertools
import operator
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import Amp, Backend, Hyper, TensorHyper
from ..plan import check_apart, check_arrays_apart, check_memory, dense
from .reference import sr_seed_part

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not importable: {type(e).__name__}: {e}"

try:
    from .. import _C
except Exception:  # the pure-Python check pass below stands in (NOTE [triton host path])
    _C = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_P, _G, _M, _V, _X, _W, _STEP, _NUMEL, _TID = range(9)  # table rows, NOTE [triton table]
_ROWS = 9  # then chunk -> tensor, chunk -> first element
_ADDRESS_ROWS = 6  # rows 0..5: what the check pass writes
# the check pass's mask (NOTE [triton host path]); _RESIZED_BIT: a param's size changed, its address maybe not
_LAYOUT_BIT, _ALIGNED_BIT, _UNIFORM_BIT, _RESIZED_BIT = 1 << 7, 1 << 6, 1 << 8, 1 << 9
_ROW_BITS = (1 << _ADDRESS_ROWS) - 1
_GROUP_SLOTS = 8  # scal[0:8]: group scalars and the uniform step's pair; per-tensor pairs follow

# Launch geometry. GPU: 16K-element chunks streamed in 1024-element tiles by 4 warps (8 fp32 per thread = two
# 128-bit accesses per array), by at most PROGRAMS_PER_SM programs per SM striding the chunk list: one launch
# covers any number of tensors, and chunks this small keep the last wave short. Interpreter: per-program cost
# dominates, so big tiles and one program per chunk.
GPU_CHUNK, GPU_BLOCK, GPU_WARPS = 1 << 14, 1024, 4
PROGRAMS_PER_SM = 8
# Registers: ptxas's own target for the aligned master-weight and stochastic-rounding variants is ~80, where it
# spills 4 bytes on sm_80 (tests/test_triton_ptx.py); for those a cap of 128 lets it allocate without spilling.
# The other variants keep ptxas's choice: 64-80 registers aligned; the unaligned variant, which holds both branches
# of the per-chunk decision (scalar accesses need a 64-bit address per element), takes ~150 on sm_90 and spills
# under a cap of 128, so it trades occupancy (3 programs of 4 warps per SM) for its aligned chunks' 128-bit accesses.
GPU_MAXNREG = 128
INTERPRET_CHUNK, INTERPRET_BLOCK = 1 << 16, 1 << 12
STEP_BLOCK = 128  # tensors per program of _capturable_step_kernel


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- kernels ---------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load(ptr, mask, MASKED: tl.constexpr, MATH_TY: tl.constexpr, SOFT_BF16: tl.constexpr):
        if SOFT_BF16 and ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter's bf16 -> fp32 conversion loses subnormals: the exact one, a 16-bit shift of the bits.
            bits_ptr = ptr.to(tl.pointer_type(tl.uint16))
            if MASKED:
                bits = tl.load(bits_ptr, mask=mask, other=0)
            else:
                bits = tl.load(bits_ptr)
            return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(MATH_TY)
        if MASKED:
            return tl.load(ptr, mask=mask, other=0.0).to(MATH_TY)
        else:
            return tl.load(ptr).to(MATH_TY)

    @triton.jit
    def _div(a, b):
        # IEEE division: div_rn for fp32 (plain `/` is approximate there); fp64's `/` is div.rn.f64.
        if a.dtype == tl.float64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _sqrt(x):
        if x.dtype == tl.float64:
            return tl.sqrt(x)  # sqrt.rn.f64
        else:
            return tl.sqrt_rn(x)

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
        # exp_avg, exp_avg_sq, max_exp_avg_sq), once per chunk, each xor the chunk's constant part of sr_bits:
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
        # fp64 math stores a narrower dtype through fp32, as c10's conversions to bf16/fp16 do (no-op for fp32).
        if ptr.dtype.element_ty != tl.float64:
            val = val.to(tl.float32)
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
              SR: tl.constexpr, MATH_TY: tl.constexpr):
        # Same order of operations as fused_adam::adam_update (csrc/adam_math.h), in MATH_TY with IEEE div and
        # sqrt; launched with FP contraction off, so the three tl.fma (ATen's add-with-alpha, lerp, addcmul) are
        # the only fused multiply-adds.
        elem = elem_base
        if SR:
            elem = elem_base + offs.to(tl.uint32)  # lo32 of the element index
        g = _load(g_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
        if UNSCALE:
            g = _div(g, grad_scale)
            _store(g_ptr + offs, g, mask, MASKED, SOFT_BF16)
        if CLIP:
            g = g * clip_coef  # for the update only: the stored grad stays unclipped
        if MAXIMIZE:
            g = -g
        if MASTER:
            p = _load(w_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
        else:
            p = _load(p_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
        if WD_MODE == 2:
            p = p * decay
        if WD_MODE == 1:
            g = tl.fma(weight_decay, p, g)  # grad.add(param, alpha=wd)
        m = _load(m_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
        m = tl.fma(lerp_coeff, g - m, tl.where(lerp_small, m, g))  # at::lerp, one fma
        v = _load(v_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = v
        if AMSGRAD:
            x = _load(x_ptr + offs, mask, MASKED, MATH_TY, SOFT_BF16)
            x = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
            _store(x_ptr + offs, x, mask, MASKED, SOFT_BF16, SR, elem, key_x)
            second = x
        denom = _div(_sqrt(second), bc2_sqrt) + eps
        p = p + _div(neg_step_size * m, denom)
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
        sr_step,  # fp32: the step every tensor is at (SCALARS < 2; else scal's step row)
        P_TY: tl.constexpr, G_TY: tl.constexpr, M_TY: tl.constexpr, V_TY: tl.constexpr, X_TY: tl.constexpr,
        MATH_TY: tl.constexpr,  # fp32, or fp64 for fp64 params
        WD_MODE: tl.constexpr,  # 0 none, 1 L2 (Adam), 2 decoupled (AdamW): fused_adam::WeightDecay
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        SCALARS: tl.constexpr,  # 0: the arguments; 1: scal[0:8] (one step for all); 2: scal, per tensor
        ALIGNED: tl.constexpr,  # every address of the launch is 16-byte aligned (else decided per chunk)
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
        SOFT_BF16: tl.constexpr,  # interpreter: round fp32 -> bf16 by hand (see _round_bf16)
        MASTER: tl.constexpr = False,  # the fp32 master (row 5) is read and written; the param is its rounding
        CLIP: tl.constexpr = False,  # grad * clip_coef (a device scalar) for the update
        SR: tl.constexpr = False,  # bf16 stores that are the only copy of a value round stochastically
    ):
        if HAS_FOUND_INF:
            if tl.load(found_inf_ptr) != 0:
                return
        if SCALARS == 0:
            omb1 = tl.cast(one_minus_beta1, MATH_TY)
            b2 = tl.cast(beta2, MATH_TY)
            omb2 = tl.cast(one_minus_beta2, MATH_TY)
            dec = tl.cast(decay, MATH_TY)
            ep = tl.cast(eps, MATH_TY)
            wd = tl.cast(weight_decay, MATH_TY)
        else:
            omb1 = tl.load(scal).to(MATH_TY)
            b2 = tl.load(scal + 1).to(MATH_TY)
            omb2 = tl.load(scal + 2).to(MATH_TY)
            dec = tl.load(scal + 3).to(MATH_TY)
            ep = tl.load(scal + 4).to(MATH_TY)
            wd = tl.load(scal + 5).to(MATH_TY)
        if SCALARS == 1:
            nss_all = tl.load(scal + 6).to(MATH_TY)
            bc2_all = tl.load(scal + 7).to(MATH_TY)
        else:
            nss_all = tl.cast(neg_step_size, MATH_TY)
            bc2_all = tl.cast(bc2_sqrt, MATH_TY)
        # make_step_scalars' choice between at::lerp's two forms, on the math-dtype value of 1 - beta1.
        lerp_small = (omb1 < 0.5) & (omb1 > -0.5)
        lerp_coeff = tl.where(lerp_small, omb1, omb1 - 1.0)
        grad_scale = tl.full([], 1.0, MATH_TY)
        if UNSCALE:
            grad_scale = tl.load(grad_scale_ptr).to(MATH_TY)
        clip_coef = tl.full([], 1.0, MATH_TY)
        if CLIP:
            clip_coef = tl.load(clip_coef_ptr).to(MATH_TY)
        # Persistent programs: program i takes chunks i, i + grid, ... (the interpreter's grid is one per chunk).
        for c in tl.range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            t = tl.load(table + 9 * n_tensors + c)
            start = tl.load(table + 9 * n_tensors + n_chunks + c)  # int64: tensors of 2^31 elements and more
            n = tl.minimum(tl.load(table + 7 * n_tensors + t) - start, CHUNK).to(tl.int32)
            p_addr = tl.load(table + t)
            g_addr = tl.load(table + n_tensors + t)
            m_addr = tl.load(table + 2 * n_tensors + t)
            v_addr = tl.load(table + 3 * n_tensors + t)
            x_addr = tl.load(table + 4 * n_tensors + t)  # 0 without amsgrad
            w_addr = p_addr
            if MASTER:
                w_addr = tl.load(table + 5 * n_tensors + t)
            if SCALARS == 2:
                neg_step = tl.load(scal + 8 + 2 * t).to(MATH_TY)
                bc2 = tl.load(scal + 9 + 2 * t).to(MATH_TY)
            else:
                neg_step = nss_all
                bc2 = bc2_all
            elem_base = tl.full([], 0, tl.uint32)
            key_p = elem_base
            key_m = elem_base
            key_v = elem_base
            key_x = elem_base
            if SR:
                if SCALARS == 2:
                    step_now = tl.load(scal + 8 + 2 * n_tensors + t).to(tl.float32)
                else:
                    step_now = sr_step
                elem_base, key_p, key_m, key_v, key_x = _sr_keys(sr_seed_key, step_now,
                                                                 tl.load(table + 8 * n_tensors + t), start)
            if ALIGNED:
                _chunk(p_addr, g_addr, m_addr, v_addr, x_addr, w_addr, start, n, grad_scale, clip_coef,
                       lerp_coeff, lerp_small, b2, omb2, dec, wd, neg_step, bc2, ep,
                       elem_base, key_p, key_m, key_v, key_x,
                       P_TY, G_TY, M_TY, V_TY, X_TY, WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, SOFT_BF16, MASTER, CLIP,
                       SR, MATH_TY, BLOCK, True)
            else:
                # 128-bit accesses decided per chunk: the chunk's start is a multiple of CHUNK elements, so its
                # arrays are 16-byte aligned when their tensors' addresses are.
                if ((p_addr | g_addr | m_addr | v_addr | x_addr | w_addr) & 15) == 0:
                    _chunk(p_addr, g_addr, m_addr, v_addr, x_addr, w_addr, start, n, grad_scale, clip_coef,
                           lerp_coeff, lerp_small, b2, omb2, dec, wd, neg_step, bc2, ep,
                           elem_base, key_p, key_m, key_v, key_x,
                           P_TY, G_TY, M_TY, V_TY, X_TY, WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, SOFT_BF16, MASTER,
                           CLIP, SR, MATH_TY, BLOCK, True)
                else:
                    _chunk(p_addr, g_addr, m_addr, v_addr, x_addr, w_addr, start, n, grad_scale, clip_coef,
                           lerp_coeff, lerp_small, b2, omb2, dec, wd, neg_step, bc2, ep,
                           elem_base, key_p, key_m, key_v, key_x,
                           P_TY, G_TY, M_TY, V_TY, X_TY, WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, SOFT_BF16, MASTER,
                           CLIP, SR, MATH_TY, BLOCK, False)

    @triton.jit
    def _chunk(p_addr, g_addr, m_addr, v_addr, x_addr, w_addr, start, n, grad_scale, clip_coef,
               lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
               elem_base, key_p, key_m, key_v, key_x,
               P_TY: tl.constexpr, G_TY: tl.constexpr, M_TY: tl.constexpr, V_TY: tl.constexpr, X_TY: tl.constexpr,
               WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr,
               SOFT_BF16: tl.constexpr, MASTER: tl.constexpr, CLIP: tl.constexpr, SR: tl.constexpr,
               MATH_TY: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
        # One chunk: n elements from `start` of one tensor's arrays, in full tiles and a masked tail tile. VEC: every
        # address is 16-byte aligned (the hints let the compiler use 128-bit accesses on full tiles).
        if VEC:
            start = tl.multiple_of(start, 16)
        p_ptr = p_addr.to(tl.pointer_type(P_TY)) + start
        g_ptr = g_addr.to(tl.pointer_type(G_TY)) + start
        m_ptr = m_addr.to(tl.pointer_type(M_TY)) + start
        v_ptr = v_addr.to(tl.pointer_type(V_TY)) + start
        x_ptr = x_addr.to(tl.pointer_type(X_TY)) + start
        w_ptr = w_addr.to(tl.pointer_type(tl.float32)) + start
        if VEC:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            x_ptr = tl.multiple_of(x_ptr, 16)
            w_ptr = tl.multiple_of(w_ptr, 16)
        n_full = n // BLOCK * BLOCK
        for off in tl.range(0, n_full, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(off + tl.arange(0, BLOCK), BLOCK), BLOCK)
            _tile(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, offs, None, grad_scale, clip_coef,
                  lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
                  elem_base, key_p, key_m, key_v, key_x,
                  WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, False, SOFT_BF16, MASTER, CLIP, SR, MATH_TY)
        if n_full < n:  # the tail tile, masked
            offs = n_full + tl.arange(0, BLOCK)
            _tile(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, offs, offs < n, grad_scale, clip_coef,
                  lerp_coeff, lerp_small, beta2, one_minus_beta2, decay, weight_decay, neg_step_size, bc2_sqrt, eps,
                  elem_base, key_p, key_m, key_v, key_x,
                  WD_MODE, AMSGRAD, MAXIMIZE, UNSCALE, True, SOFT_BF16, MASTER, CLIP, SR, MATH_TY)

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
        table, n_tensors, scal, found_inf_ptr, lr_ptr, beta1_ptr, beta2_ptr, hyper_ptr,
        HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # step += 1 (- found_inf, as torch's fused step), then each tensor's bias corrections from its own
        # step, in fp64 as make_step_scalars, rounded once to scal's dtype (NOTE [triton table]).
        # hyper_ptr: fp64 [lr, beta1, beta2, weight_decay, eps] (the float ones; lr/beta pointers may be tensors).
        pid = tl.program_id(0)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n_tensors
        step_ptrs = tl.load(table + 6 * n_tensors + idx, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptrs, mask=mask, other=0.0)
        inc = 1.0
        if HAS_FOUND_INF:
            inc = 1.0 - (tl.load(found_inf_ptr).to(tl.float32) != 0).to(tl.float32)
        step = step + inc
        tl.store(step_ptrs, step, mask=mask)
        lr_in = tl.load(lr_ptr)  # a Tensor lr's dtype (fp32 usually), or fp64 for a float lr
        lr = lr_in.to(tl.float64)
        beta1 = tl.load(beta1_ptr).to(tl.float64)
        beta2 = tl.load(beta2_ptr).to(tl.float64)
        e = tl.maximum(step, 1.0).to(tl.int64)  # step 0 only when found_inf skips the update
        bc1 = 1.0 - _pow_int(tl.full([BLOCK], 0.0, tl.float64) + beta1, e)
        bc2 = 1.0 - _pow_int(tl.full([BLOCK], 0.0, tl.float64) + beta2, e)
        out_ty = scal.dtype.element_ty
        tl.store(scal + 8 + 2 * idx, (-(lr / bc1)).to(out_ty), mask=mask)
        tl.store(scal + 9 + 2 * idx, tl.sqrt(bc2).to(out_ty), mask=mask)
        tl.store(scal + 8 + 2 * n_tensors + idx, step.to(out_ty), mask=mask)  # SR's salt (NOTE [triton sr])
        if pid == 0:
            tl.store(scal, (1.0 - beta1).to(out_ty))
            tl.store(scal + 1, beta2.to(out_ty))
            tl.store(scal + 2, (1.0 - beta2).to(out_ty))
            weight_decay = tl.load(hyper_ptr + 3)
            # AdamW's 1 - lr * wd in lr's dtype, as torch computes it with a Tensor lr (and the host path here)
            tl.store(scal + 3, (1.0 - lr_in * weight_decay.to(lr_in.dtype)).to(out_ty))
            tl.store(scal + 4, tl.load(hyper_ptr + 4).to(out_ty))
            tl.store(scal + 5, weight_decay.to(out_ty))


_TL_DTYPE = {}
if tl is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                 torch.float64: tl.float64}


# ---- the check pass: native, or the same in Python ------------------------------------------------------------

# NOTE [triton host path]: a step's host work is O(1) Python: one native pass over the partition
# (_C.Partition.addresses: reads each param's .grad, checks every tensor that moved since the last step (NOTE [pass
# cache]), writes the six address rows of NOTE [triton table] into `out` and says which rows changed, whether every
# address is 16-byte aligned and whether every tensor's arrays share one dense layout, and reads and bumps the step
# counts, NOTE [host steps]), one host-to-device copy of the rows that changed (usually the grad row, or nothing),
# the launch. A `.data` replaced with a tensor of the same shape is stepped where it now lives; another shape is an
# error of the check pass, before anything is written. Unusual layouts (bit 7 clear) take the staging path, which
# is per tensor.
_NATIVE_ADDRESSES = _C is not None and hasattr(getattr(_C, "Partition", None), "addresses")
_WHO = "FusedAdam (triton backend)"


_shape, _stride, _dtype, _device, _layout = (operator.attrgetter(k) for k in ("shape", "stride", "dtype", "device", "layout"))


class _PyPartition:
    """_C.Partition's check pass (`addresses`) in Python, same semantics, where the extension lacks it: each check
    but the memory ones (check_memory, per tensor) runs as one C-level map over a list; the per-tensor loop that
    words the error runs only when one fails."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, master_params=(),
                 tensor_ids=(), options=None):
        self.lists = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params)
        self.steps = state_steps
        self.host_counts = options is None or not options.capturable
        self.numels = list(map(Tensor.numel, params))  # what the partition's chunk table was made for

    def addresses(self, grads: list[Tensor] | None, out: Tensor, counts: Tensor | None = None, *,
                  grads_written: bool = False) -> tuple[int, float | None]:
        params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters = self.lists
        n = len(params)
        if grads is None:
            grads = [p.grad for p in params]
            if not all(map(operator.is_not, grads, itertools.repeat(None))):
                return -1, None
        elif len(grads) != n:
            raise ValueError(f"{_WHO}: grads has {len(grads)} tensors, expected {n} (one per param)")
        named = [("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                 ("max_exp_avg_sqs", max_exp_avg_sqs), ("master_params", masters)]
        named = [(name, lst) for name, lst in named if lst]
        device, dtype, state_dtype = params[0].device, params[0].dtype, exp_avgs[0].dtype
        wants = {"params": dtype, "grads": dtype, "master_params": torch.float32}
        try:
            shapes = list(map(_shape, params))
            ok = all(set(map(_layout, lst)) == {torch.strided} and set(map(_device, lst)) == {device}
                     and set(map(_dtype, lst)) == {wants.get(name, state_dtype)} and list(map(_shape, lst)) == shapes
                     for name, lst in named)
        except AttributeError:  # a None: worded below
            ok = False
        if not ok:
            self._raise_first(named, device, dtype, state_dtype)
        for name, lst in [*named, ("state_steps", self.steps)]:
            for i, t in enumerate(lst):
                check_memory(_WHO, name, i, t, grads_written=grads_written)
        for i in range(n):
            check_apart(_WHO, [(name, lst[i]) for name, lst in named], i)
        check_arrays_apart(_WHO, [*named, ("state_steps", self.steps)])
        strides = list(map(_stride, params))
        layout = (all(list(map(_stride, lst)) == strides for _, lst in named[1:])
                  and all(dense(p) for p, contiguous in zip(params, map(Tensor.is_contiguous, params))
                          if not contiguous))
        now = torch.stack(self.steps).reshape(-1) if self.host_counts and n else None
        if now is not None and not bool((now >= 0).all()):  # tensor_pass.h's check_counts, before `out` is written
            i = int((~(now >= 0)).nonzero()[0])
            raise ValueError(f"{_WHO}: state_steps[{i}] is {now[i].item()}; a step count is a number >= 0")
        rows = [list(map(Tensor.data_ptr, lst)) if lst else [0] * n
                for lst in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters)]
        new = torch.tensor(rows, dtype=torch.int64).reshape(_ADDRESS_ROWS, n)
        changed = (new != out).any(dim=1).tolist()
        mask = sum(1 << r for r, c in enumerate(changed) if c)
        if not bool((new & 15).any()):
            mask |= _ALIGNED_BIT
        if layout:
            mask |= _LAYOUT_BIT
        numels = list(map(Tensor.numel, params))
        if numels != self.numels:
            mask |= _RESIZED_BIT
            self.numels = numels
        out.copy_(new)
        before = None
        if counts is not None and n:  # NOTE [host steps]
            counts.copy_(now)
            torch._foreach_add_(self.steps, _ONE)
            lo, hi = torch.aminmax(counts)
            if lo.item() == hi.item():  # (NaN counts are not)
                mask |= _UNIFORM_BIT
                before = lo.item()
        return mask, before

    @staticmethod
    def _raise_first(named, device, dtype, state_dtype) -> None:
        """The error of the first bad tensor, in the native pass's order (tensor by tensor, list by list)."""
        params = named[0][1]
        for i, p in enumerate(params):
            for name, lst in named:
                t = lst[i]
                if t is None:
                    raise RuntimeError(f"{_WHO}: {name}[{i}] is None")
                if t.layout != torch.strided:
                    raise RuntimeError(f"{_WHO}: {name}[{i}] has layout {t.layout}; only strided (dense) tensors "
                                       "are supported")
                if t.device != device:
                    raise RuntimeError(f"{_WHO}: {name}[{i}] is on {t.device}, expected {device}")
                want, like = ((dtype, "params[0]") if name in ("params", "grads") else
                              (torch.float32, None) if name == "master_params" else (state_dtype, "exp_avgs[0]"))
                if t.dtype != want:
                    raise TypeError(f"{_WHO}: {name}[{i}] has dtype {t.dtype}, "
                                    + (f"but {like} has dtype {want}" if like else f"expected {want}"))
                if t.shape != p.shape:
                    raise RuntimeError(f"{_WHO}: {name}[{i}] has shape {list(t.shape)}, but params[{i}] has shape "
                                       f"{list(p.shape)}")


def _partition_checker(part):
    lists = {"options": part.options}
    if part.options.master:
        lists["master_params"] = list(part.master_params)
    if part.options.stochastic_rounding:
        lists["tensor_ids"] = list(part.tensor_ids)
    cls = _C.Partition if _NATIVE_ADDRESSES else _PyPartition
    return cls(part.params, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs, part.state_steps, **lists)


# NOTE [host steps]: without capturable, the step counts are 0-dim float32 CPU tensors, one per param (views into
# one buffer, NOTE [packed states] in state.py). The check pass reads them through the addresses it checked and
# bumps them (Partition.addresses' `counts`): the counts before the step, all equal in the usual case (one pair of
# scalars for the launch), else one pair per tensor.
_ONE = torch.ones(())


# ---- host side -------------------------------------------------------------------------------------------------


def _float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _host_scalars(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """make_step_scalars' step-dependent pair, in double: (-lr / (1 - beta1^t), (1 - beta2^t) ** 0.5)."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return -(lr / bias_correction1), bias_correction2**0.5


def _sr_seed_key(seed: int) -> int:
    """sr_salt's seed part (csrc/rounding.h), as the int32 with its bits: the kernel finishes the salt."""
    h = sr_seed_part(seed)
    return h - (1 << 32) if h >= 1 << 31 else h  # always an i32 argument: one compile


def _geometry(device: torch.device) -> tuple[int, int, int]:
    if device.type == "cpu":
        return INTERPRET_CHUNK, INTERPRET_BLOCK, 1
    return GPU_CHUNK, GPU_BLOCK, GPU_WARPS


def _grid(device: torch.device, n_chunks: int) -> int:
    """Programs of one launch: one per chunk in the interpreter; on a GPU at most PROGRAMS_PER_SM per SM."""
    if device.type == "cpu":
        return n_chunks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_chunks, PROGRAMS_PER_SM * sms))


def _compile_options(device: torch.device, master: bool, sr: bool, aligned: bool) -> dict:
    """Launch options beyond the geometry: see GPU_MAXNREG."""
    return {"maxnreg": GPU_MAXNREG} if device.type != "cpu" and (master or sr) and aligned else {}


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _check_not_capturing(device: torch.device, what: str) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{_WHO}: {what} changed during CUDA graph capture; run one eager step with the same tensors before "
            "capturing, and keep them (static grads) while the graph is replayed"
        )


def chunk_rows(numels: list[int], chunk: int) -> tuple[Tensor, Tensor]:
    """NOTE [chunk table]: chunk -> tensor index and chunk -> first element, for tensors of these numels."""
    nums = torch.tensor(numels, dtype=torch.int64)
    per = (nums + chunk - 1) // chunk
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per)
    first = torch.cumsum(per, 0) - per
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first[chunk_tensor]) * chunk
    return chunk_tensor, chunk_start


@dataclass(eq=False)
class _Prepared:
    """What prepare() keeps for a partition's life (part.prepared)."""

    checker: object  # _C.Partition (or _PyPartition): the per-step check pass
    out: Tensor  # (6, T) int64 host: the address rows as uploaded to table[:6T]
    table: Tensor  # NOTE [triton table], on the device
    n_chunks: int
    grid: int
    math: torch.dtype
    constexprs: dict  # the launch's structure, fixed for the partition
    options: dict  # ALIGNED -> compile options (_compile_options)
    counts: Tensor | None  # the step counts before the step (NOTE [host steps]); None when capturable
    scal: Tensor | None = None  # capturable: written by _capturable_step_kernel
    hyper_key: tuple | None = None  # capturable: values in hyper_dev
    hyper_dev: Tensor | None = None
    sr_contiguous: bool = False  # SR: every param was contiguous at the last check (NOTE [triton sr])
    scratch: dict[int, list[Tensor]] = field(default_factory=dict)  # staging: position -> p, g, m, v, x, w copies
    check_out: Tensor | None = None  # check(): the pass's rows, apart from `out`
    resized: bool = False  # a pass saw a param's size change (it reports that once): the chunk table is stale
    staged_rows: int = 0  # rows where the device holds staging copies' addresses (`out` holds the tensors')


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self) -> str | None:
        return _IMPORT_ERROR

    def supports(self, part) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        o = part.options
        if o.differentiable:
            return "differentiable=True: only the reference backend keeps autograd through the step"
        if part.dtype not in _KERNEL_DTYPES:
            return f"{part.dtype} params are not supported (fp32, fp64, bf16 and fp16 are)"
        if o.state_dtype not in _KERNEL_DTYPES:
            return f"state_dtype={o.state_dtype} is not supported (fp32, fp64, bf16 and fp16 states are)"
        if part.device.type == "cpu":
            if not _interpret():
                return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
            return None
        if part.device.type != "cuda":
            return f"device type {part.device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
        return None

    def prepare(self, part) -> None:
        device, o, n = part.device, part.options, len(part.params)
        chunk, block, warps = _geometry(device)
        numels = [p.numel() for p in part.params]
        chunk_tensor, chunk_start = chunk_rows(numels, chunk)
        n_chunks = int(chunk_tensor.numel())
        host = torch.zeros(_ROWS * n + 2 * n_chunks, dtype=torch.int64)
        if o.capturable:
            host[_STEP * n:(_STEP + 1) * n] = torch.tensor([s.data_ptr() for s in part.state_steps], dtype=torch.int64)
        host[_NUMEL * n:(_NUMEL + 1) * n] = torch.tensor(numels, dtype=torch.int64)
        if o.stochastic_rounding:
            host[_TID * n:(_TID + 1) * n] = torch.tensor(part.tensor_ids, dtype=torch.int64)
        host[_ROWS * n:] = torch.cat([chunk_tensor, chunk_start])
        math = torch.float64 if part.dtype == torch.float64 else torch.float32
        sd = o.state_dtype
        constexprs = dict(
            P_TY=_TL_DTYPE[part.dtype], G_TY=_TL_DTYPE[part.dtype], M_TY=_TL_DTYPE[sd], V_TY=_TL_DTYPE[sd],
            X_TY=_TL_DTYPE[sd], MATH_TY=_TL_DTYPE[math], WD_MODE=int(o.wd_mode), AMSGRAD=o.amsgrad,
            MAXIMIZE=o.maximize, CHUNK=chunk, BLOCK=block, SOFT_BF16=device.type == "cpu", MASTER=o.master,
            CLIP=o.clip, SR=o.stochastic_rounding, num_warps=warps, enable_fp_fusion=False,
        )
        prep = _Prepared(
            checker=_partition_checker(part), out=torch.zeros(_ADDRESS_ROWS, n, dtype=torch.int64),
            table=_to_device(host, device), n_chunks=n_chunks, grid=_grid(device, n_chunks), math=math,
            constexprs=constexprs, counts=None if o.capturable else torch.empty(n, dtype=torch.float32),
            options={a: _compile_options(device, o.master, o.stochastic_rounding, a) for a in (False, True)},
        )
        if o.capturable:
            prep.scal = torch.zeros(_GROUP_SLOTS + 3 * n, dtype=math, device=device)
        part.prepared = prep

    def step(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp, checked: bool = False) -> bool:
        # (checked: the pass runs again, on host memory that the launches in between left in cache)
        return _step(part, part.prepared, grads, hp, amp)

    def check(self, part, grads: list[Tensor] | None, hp: Hyper, amp: Amp) -> bool:
        # The pass of a step, into rows of its own: `out` stays what the device table holds, so the step's pass
        # still sees what moved (every row: `out` is not the tensor of the last call).
        prep = part.prepared
        if not part.params:
            return True
        if prep.check_out is None:
            prep.check_out = torch.zeros_like(prep.out)
        mask, _ = prep.checker.addresses(grads, prep.check_out, None, grads_written=amp.grad_scale is not None)
        if mask >= 0:
            prep.resized |= bool(mask & _RESIZED_BIT)
            _check_dtypes(part)
        return mask >= 0


BACKEND = TritonBackend()


def _stage(part, prep: _Prepared, grads: list[Tensor] | None, out: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list, int]:
    """The unusual layouts (NOTE [triton host path]), per tensor: tensors whose arrays do not share one dense
    layout (with stochastic rounding: are not contiguous) run on contiguous scratch copies; a grad whose strides
    differ from its param's runs on a copy with the param's strides. Patches `out` to the copies' addresses.
    Returns (copies to make before the launch as (dst, src)), (copies back after it, as (dst, src, is_grad)),
    and the mask of rows patched."""
    o = part.options
    gs = grads if grads is not None else [p.grad for p in part.params]
    before, after = [], []
    rows = 0
    prep.sr_contiguous = all(p.is_contiguous() for p in part.params)
    for i, p in enumerate(part.params):
        arrays = [p, gs[i], part.exp_avgs[i], part.exp_avg_sqs[i]]
        arrays.append(part.max_exp_avg_sqs[i] if o.amsgrad else None)
        arrays.append(part.master_params[i] if o.master else None)
        fixed = [a for k, a in enumerate(arrays) if a is not None and k != _G]
        layout_ok = p.is_contiguous() if o.stochastic_rounding else dense(p)
        if layout_ok and all(a.stride() == p.stride() for a in fixed):
            g = gs[i]
            if g.stride() != p.stride() and g.numel() > 1:
                copy = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device)
                before.append((copy, g))
                after.append((g, copy, True))
                out[_G, i] = copy.data_ptr()
                rows |= 1 << _G
            continue
        bufs = prep.scratch.get(i)
        if bufs is None or any(b is not None and b.shape != p.shape for b in bufs):
            bufs = [None if a is None else torch.empty(p.shape, dtype=a.dtype, device=a.device) for a in arrays]
            prep.scratch[i] = bufs
        for k, (a, b) in enumerate(zip(arrays, bufs)):
            if a is None:
                continue
            before.append((b, a))
            if k != _G:
                after.append((a, b, False))
            else:
                after.append((a, b, True))
            out[k, i] = b.data_ptr()
            rows |= 1 << k
    return before, after, rows


def _upload_rows(prep: _Prepared, rows: int, device: torch.device, source: Tensor) -> None:
    """Rows lo..hi of `source` (`out`, or a copy with staging's addresses; every row flagged lies in that range)
    to table[lo*T:(hi+1)*T]: one copy."""
    lo = (rows & -rows).bit_length() - 1
    hi = rows.bit_length() - 1
    T = source.shape[1]
    _check_not_capturing(device, "the params', grads' or states' addresses")
    src = source[lo:hi + 1].reshape(-1)
    dst = prep.table[lo * T:(hi + 1) * T]
    if device.type == "cpu":
        dst.copy_(src)
    else:
        # a fresh pinned copy per upload: the caching host allocator keeps it until the copy has run, so the next
        # step may rewrite `out` while this one is still queued
        dst.copy_(src.pin_memory(), non_blocking=True)


def _step(part, prep: _Prepared, grads: list[Tensor] | None, hp: Hyper, amp: Amp) -> bool:
    T = len(part.params)
    if T == 0:
        return True
    o = part.options
    device = part.device
    found_inf, grad_scale = amp.found_inf, amp.grad_scale
    # found_inf skips the step: the counts stay (on the host, reading it there is the only way); the checks still run
    skip = not o.capturable and found_inf is not None and bool(found_inf.item())
    counts = None if o.capturable or skip else prep.counts
    mask, count = prep.checker.addresses(grads, prep.out, counts, grads_written=grad_scale is not None)
    if mask < 0:
        return False  # a param without a grad: nothing changed, the plan is rebuilt
    prep.resized |= bool(mask & _RESIZED_BIT)
    try:
        return _checked_step(part, prep, grads, hp, amp, mask, count, counts, skip)
    except BaseException:
        # Nothing was stepped: the counts the pass bumped go back, and `out` (what the pass saw, which the device
        # table may now lack) is forgotten: the next pass writes every row into a new tensor of zeros and uploads
        # what differs.
        _unbump(part, counts)
        prep.out = torch.zeros_like(prep.out)
        raise


def _unbump(part, counts: Tensor | None) -> None:
    """The step counts back to `counts`, what the check pass read before it bumped them (None: it did not)."""
    if counts is not None:
        torch._foreach_copy_(part.state_steps, list(counts.unbind()))


def _check_dtypes(part) -> None:
    """The kernel's dtypes are the partition's; the check pass compares the tensors with each other (a `.data` of
    another dtype on every param of a partition, and on its states, passes it), so this compares the first ones
    with the partition."""
    p, m = part.params[0], part.exp_avgs[0]
    if p.dtype != part.dtype or m.dtype != part.options.state_dtype:
        raise TypeError(f"{_WHO}: params[0] has dtype {p.dtype} and exp_avgs[0] {m.dtype}, but the partition was "
                        f"made for {part.dtype} and {part.options.state_dtype}")


def _checked_step(part, prep: _Prepared, grads, hp: Hyper, amp: Amp, mask: int, count, counts, skip: bool) -> bool:
    _check_dtypes(part)
    T = len(part.params)
    o = part.options
    device = part.device
    found_inf, grad_scale = amp.found_inf, amp.grad_scale
    rows = mask & _ROW_BITS
    if prep.resized:
        # A param (and its states: the check pass compared their shapes) now has another size: the chunk table
        # follows it, as torch's for-loop steps the new tensors.
        _check_not_capturing(device, "a param's size")
        _unbump(part, counts)  # the step below bumps them again
        BACKEND.prepare(part)
        return _step(part, part.prepared, grads, hp, amp)
    aligned = bool(mask & _ALIGNED_BIT)
    if o.stochastic_rounding and rows & ~(1 << _G):
        prep.sr_contiguous = all(p.is_contiguous() for p in part.params)  # a param or state moved
    before, after = [], []
    # The rows the device holds staging copies' addresses in since the last step: `out` has the tensors' own.
    rows |= prep.staged_rows
    prep.staged_rows = 0
    source = prep.out
    if not mask & _LAYOUT_BIT or (o.stochastic_rounding and not prep.sr_contiguous):
        source = prep.out.clone()
        before, after, staged = _stage(part, prep, grads, source)
        rows |= staged
        prep.staged_rows = staged
        if staged:
            aligned = bool((source % 16 == 0).all())
    if rows:
        _upload_rows(prep, rows, device, source)
    if skip:
        return True

    table = prep.table
    sr_step = 0.0
    args = (1.0,) * 8
    if o.capturable:
        _capturable_scalars(prep, hp, found_inf, device, T)
        scal, scalars = prep.scal, 2
    else:
        wd = float(hp.weight_decay)
        tensors = TensorHyper.of(hp)
        if tensors is None:
            lr, beta1, beta2 = float(hp.lr), float(hp.beta1), float(hp.beta2)
            group = [1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * wd, float(hp.eps), wd]
            step_pair = lambda step: _host_scalars(lr, beta1, beta2, step)  # noqa: E731
        else:  # NOTE [tensor hyperparameters]: the scalars torch computes from the Tensors, as it computes them
            decay = tensors.decay(wd) if o.decoupled else 1.0
            group = [tensors.lerp_weight(prep.math), float(tensors.beta2), tensors.one_minus_beta2(), decay,
                     float(hp.eps), wd]  # (exp_avg_sq.mul_(beta2): the Tensor's value, rounded once to the math dtype)
            step_pair = tensors.step_pair
        if count is not None:
            sr_step = count + 1.0
            pair = step_pair(sr_step)
            if prep.math == torch.float32:
                scal, scalars = table, 0
                args = (*pair, *group)
            else:  # fp64 scalars do not fit a kernel argument
                scal, scalars = _to_device(torch.tensor(group + list(pair), dtype=prep.math), device), 1
        else:
            after_counts = prep.counts + _ONE
            uniq, inv = torch.unique(after_counts, return_inverse=True)
            pairs = torch.tensor([step_pair(s) for s in uniq.tolist()], dtype=torch.float64)
            host = torch.cat([torch.tensor(group + [0.0, 0.0], dtype=torch.float64), pairs[inv].reshape(-1),
                              after_counts.double()])
            scal, scalars = _to_device(host.to(prep.math), device), 2
    clip_coef = amp.clip_coef
    if clip_coef is not None:
        clip_coef = clip_coef.to(device=device, dtype=torch.float32)
    sr_seed_key = _sr_seed_key(o.seed) if o.stochastic_rounding else 0
    if before:
        torch._foreach_copy_([d for d, _ in before], [s for _, s in before])
    if prep.n_chunks:
        _launch(prep, T, scal,
                grad_scale if grad_scale is not None else table,
                found_inf if (found_inf is not None and o.capturable) else table,
                clip_coef if clip_coef is not None else table,
                args, sr_seed_key, sr_step,
                dict(UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None and o.capturable,
                     SCALARS=scalars, ALIGNED=aligned))
    back = [(d, s) for d, s, is_grad in after if not is_grad or grad_scale is not None]
    if back:
        torch._foreach_copy_([d for d, _ in back], [s for _, s in back])
    return True


def _launch(prep: _Prepared, T: int, scal, grad_scale, found_inf, clip_coef, args, sr_seed_key, sr_step, flags):
    _adam_kernel[(prep.grid,)](
        prep.table, T, prep.n_chunks, scal, grad_scale, found_inf, clip_coef, *args, sr_seed_key, sr_step,
        **prep.constexprs, **flags, **prep.options[flags["ALIGNED"]],
    )


def _capturable_scalars(prep: _Prepared, hp: Hyper, found_inf, device, T: int) -> None:
    """capturable: bump the device steps and write scal on the device. lr and betas are read where they live (a
    device tensor, e.g. a scheduler's), else from a cached fp64 copy."""
    values = [None if isinstance(x, Tensor) and x.device == device else _float(x) for x in (hp.lr, hp.beta1, hp.beta2)]
    key = (*values, float(hp.weight_decay), float(hp.eps))
    if prep.hyper_key != key:
        _check_not_capturing(device, "a float lr, beta, eps or weight decay")
        host = [0.0 if v is None else v for v in values] + [float(hp.weight_decay), float(hp.eps)]
        prep.hyper_dev = _to_device(torch.tensor(host, dtype=torch.float64), device)
        prep.hyper_key = key
    ptrs = [x if v is None else prep.hyper_dev[k:k + 1]
            for k, (x, v) in enumerate(zip((hp.lr, hp.beta1, hp.beta2), values))]
    _capturable_step_kernel[(triton.cdiv(T, STEP_BLOCK),)](
        prep.table, T, prep.scal, found_inf if found_inf is not None else prep.table, *ptrs, prep.hyper_dev,
        HAS_FOUND_INF=found_inf is not None, BLOCK=STEP_BLOCK, enable_fp_fusion=False,
    )
