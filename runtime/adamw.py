"""Fused AdamW kernels (Triton) exposed as ``torch.ops.unsloth_fx.*``.

One kernel reads the weight (fp32/bf16/fp16), the gradient and the moments of
one parameter and writes the weight and moments back in a single pass.  The
kernel is specialised (``constexpr``) per moment tier:

========  ==================================  =========================
tier      moment storage                       state bytes / parameter
========  ==================================  =========================
fp32      2 x fp32                             8
bf16      2 x bf16 (stochastic rounding)       4
int8      int8 m + uint8 v, fp32 scale/128     2 + 8/128 = 2.0625
int4      4-bit m + 4-bit v, fp32 scale/128    1 + 8/128 = 1.0625
hybrid    int8/int4 store + fp32 rows for the  low tier + 4/128 (slot)
          gated blocks (<= cap of blocks)      + 4/128 (err) + cap * 8
========  ==================================  =========================

Ops (all in place, no Python-side state, hyper-parameters as 0-d tensors so
that a schedule changing ``lr`` does not recompile a graph that calls them):

* ``unsloth_fx::adamw_step_``        fp32 / bf16 moments (dtype of exp_avg)
* ``unsloth_fx::adamw_step_quant_``  int8 / int4 blockwise moments
* ``unsloth_fx::adamw_step_hybrid_`` per-block gated fp32 / quantized moments

``step`` is the step count *after* this update (1 on the first call);
``found_inf`` (0-d, optional) nonzero skips the whole parameter; a block whose
gradient holds NaN/inf is always left untouched.  The weight, when bf16, is
rounded stochastically with Philox4x32 keyed by ``seed`` with counter
``(element index, step)``: the same seed and step give the same bits.

CPU tensors run the pure-PyTorch reference (``optim_reference.py``) unless
``TRITON_INTERPRET=1``, in which case the Triton kernel runs in the
interpreter (that is how the CPU tests compare the two).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from unsloth_fx import _compat

from . import optim_reference as ref
from .optim_reference import BLOCK, HALF, PHILOX_ROUNDS, QM, QV, nblocks

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

TIER_FP32, TIER_BF16, TIER_INT8, TIER_INT4 = 0, 1, 2, 3
BLOCKS_PER_PROGRAM = 16  # 16 x 128 = 2048 elements per program


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_triton(t: Tensor) -> bool:
    """Whether the ops run the Triton kernel (rather than the reference) for ``t``."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and _interpret()


if HAS_TRITON:

    @triton.jit
    def _enc_m(x, a_safe, Q: tl.constexpr):
        q = (tl.sqrt(tl.abs(x) / a_safe) * Q + 0.5).to(tl.int32)
        return tl.where(x < 0, -q, q)

    @triton.jit
    def _dec_m(q, a, Q: tl.constexpr):
        t = tl.abs(q).to(tl.float32) * (1.0 / Q)
        val = t * t * a
        return tl.where(q < 0, -val, val)

    @triton.jit
    def _enc_v(x, um_safe, Q: tl.constexpr):
        r = tl.sqrt(x) / um_safe
        f = tl.maximum(tl.sqrt(r) * (Q + 1) - 1.0, 0.0)
        return tl.minimum((f + 0.5).to(tl.int32), Q)

    @triton.jit
    def _dec_v(q, um, Q: tl.constexpr):
        t = (q.to(tl.float32) + 1.0) * (1.0 / (Q + 1))
        u = t * t * um
        return u * u

    @triton.jit
    def _sr_bf16(x, r):
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (r & 0xFFFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _rne_bf16(x):
        # explicit round-to-nearest-even: the interpreter's fp32->bf16 cast truncates,
        # the GPU's rounds to nearest; spelling it out makes both agree with torch
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_body(
        pid,
        p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, slot_ptr, pm_ptr, pv_ptr, err_ptr,
        lr_ptr, b1_ptr, b2_ptr, eps_ptr, wd_ptr, step_ptr, skip_ptr,
        N, NBLK, seed,
        TIER: tl.constexpr, HYBRID: tl.constexpr, WRITE_ERR: tl.constexpr,
        HAS_SKIP: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr,
        P_KIND: tl.constexpr,  # 0 fp32, 1 bf16, 2 fp16
        BLOCK: tl.constexpr, NB: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # program ``pid`` of one parameter: blocks [pid * NB, pid * NB + NB) of its NBLK blocks
        HALF: tl.constexpr = BLOCK // 2
        QM: tl.constexpr = 127 if TIER == 2 else 7
        QV: tl.constexpr = 255 if TIER == 2 else 15
        rows = pid * NB + tl.arange(0, NB)
        rmask = rows < NBLK
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, HALF)
        i_lo = rows64[:, None] * BLOCK + cols[None, :]
        i_hi = i_lo + HALF
        e_lo = i_lo < N
        e_hi = i_hi < N

        lr = tl.load(lr_ptr).to(tl.float32)
        b1 = tl.load(b1_ptr).to(tl.float32)
        b2 = tl.load(b2_ptr).to(tl.float32)
        eps = tl.load(eps_ptr).to(tl.float32)
        wd = tl.load(wd_ptr).to(tl.float32)
        step = tl.load(step_ptr).to(tl.float32)
        wdf = 1.0 - lr * wd
        bc1 = 1.0 - tl.exp2(step * tl.log2(b1))
        bc2 = 1.0 - tl.exp2(step * tl.log2(b2))
        step_size = lr / bc1
        bc2s = tl.sqrt(bc2)

        g_lo = tl.load(g_ptr + i_lo, mask=e_lo, other=0.0).to(tl.float32)
        g_hi = tl.load(g_ptr + i_hi, mask=e_hi, other=0.0).to(tl.float32)
        fin = (tl.abs(g_lo) <= 3.4028234663852886e38).to(tl.int32)
        fin_hi = (tl.abs(g_hi) <= 3.4028234663852886e38).to(tl.int32)
        ok = rmask & (tl.min(fin, axis=1) > 0) & (tl.min(fin_hi, axis=1) > 0)
        if HAS_SKIP:
            # a vector load of the one flag keeps `ok` a tensor (the interpreter rejects bool-scalar & tensor)
            ok = ok & (tl.load(skip_ptr + rows * 0, mask=rmask, other=0.0).to(tl.float32) == 0.0)
        ok2 = ok[:, None]

        p_lo = tl.load(p_ptr + i_lo, mask=e_lo, other=0.0).to(tl.float32)
        p_hi = tl.load(p_ptr + i_hi, mask=e_hi, other=0.0).to(tl.float32)

        # ---- load moments -------------------------------------------------
        if TIER <= 1:
            m_lo = tl.load(m_ptr + i_lo, mask=e_lo, other=0.0).to(tl.float32)
            m_hi = tl.load(m_ptr + i_hi, mask=e_hi, other=0.0).to(tl.float32)
            v_lo = tl.load(v_ptr + i_lo, mask=e_lo, other=0.0).to(tl.float32)
            v_hi = tl.load(v_ptr + i_hi, mask=e_hi, other=0.0).to(tl.float32)
        else:
            lmask = rmask
            if HYBRID:
                slot = tl.load(slot_ptr + rows, mask=rmask, other=-1)
                hp = slot >= 0
                lmask = rmask & (slot < 0)
            lmask2 = lmask[:, None]
            am = tl.load(ms_ptr + rows, mask=lmask, other=0.0)[:, None]
            um = tl.load(vs_ptr + rows, mask=lmask, other=0.0)[:, None]
            if TIER == 2:
                qm_lo = tl.load(m_ptr + i_lo, mask=lmask2, other=0).to(tl.int32)
                qm_hi = tl.load(m_ptr + i_hi, mask=lmask2, other=0).to(tl.int32)
                qv_lo = tl.load(v_ptr + i_lo, mask=lmask2, other=0).to(tl.int32)
                qv_hi = tl.load(v_ptr + i_hi, mask=lmask2, other=0).to(tl.int32)
            else:
                i_b = rows64[:, None] * HALF + cols[None, :]
                bm = tl.load(m_ptr + i_b, mask=lmask2, other=0x88).to(tl.int32)
                bv = tl.load(v_ptr + i_b, mask=lmask2, other=0).to(tl.int32)
                qm_lo = (bm & 15) - 8
                qm_hi = (bm >> 4) - 8
                qv_lo = bv & 15
                qv_hi = bv >> 4
            m_lo = _dec_m(qm_lo, am, QM)
            m_hi = _dec_m(qm_hi, am, QM)
            v_lo = _dec_v(qv_lo, um, QV)
            v_hi = _dec_v(qv_hi, um, QV)
            if HYBRID:
                srow = tl.maximum(slot, 0).to(tl.int64)[:, None] * BLOCK + cols[None, :]
                hmask = (rmask & hp)[:, None]
                m_lo = tl.where(hmask, tl.load(pm_ptr + srow, mask=hmask, other=0.0), m_lo)
                m_hi = tl.where(hmask, tl.load(pm_ptr + srow + HALF, mask=hmask, other=0.0), m_hi)
                v_lo = tl.where(hmask, tl.load(pv_ptr + srow, mask=hmask, other=0.0), v_lo)
                v_hi = tl.where(hmask, tl.load(pv_ptr + srow + HALF, mask=hmask, other=0.0), v_hi)

        # ---- AdamW (decoupled weight decay, bias correction) --------------
        p_lo = p_lo * wdf
        p_hi = p_hi * wdf
        m_lo = b1 * m_lo + (1.0 - b1) * g_lo
        m_hi = b1 * m_hi + (1.0 - b1) * g_hi
        v_lo = b2 * v_lo + (1.0 - b2) * g_lo * g_lo
        v_hi = b2 * v_hi + (1.0 - b2) * g_hi * g_hi
        d_lo = tl.sqrt(v_lo) / bc2s + eps
        d_hi = tl.sqrt(v_hi) / bc2s + eps
        p_lo = p_lo - step_size * (m_lo / d_lo)
        p_hi = p_hi - step_size * (m_hi / d_hi)

        # ---- random bits: Philox(seed; element index, step) ---------------
        if SR_P or SR_M:
            stp = step.to(tl.int64) << 32
            r0_lo, r1_lo, r2_lo, _u0 = tl.randint4x(seed, stp | i_lo, ROUNDS)
            r0_hi, r1_hi, r2_hi, _u1 = tl.randint4x(seed, stp | i_hi, ROUNDS)

        # ---- weights -------------------------------------------------------
        s_lo = e_lo & ok2
        s_hi = e_hi & ok2
        if P_KIND == 1:
            if SR_P:
                tl.store(p_ptr + i_lo, _sr_bf16(p_lo, r0_lo), mask=s_lo)
                tl.store(p_ptr + i_hi, _sr_bf16(p_hi, r0_hi), mask=s_hi)
            else:
                tl.store(p_ptr + i_lo, _rne_bf16(p_lo), mask=s_lo)
                tl.store(p_ptr + i_hi, _rne_bf16(p_hi), mask=s_hi)
        elif P_KIND == 2:
            tl.store(p_ptr + i_lo, p_lo.to(tl.float16), mask=s_lo)
            tl.store(p_ptr + i_hi, p_hi.to(tl.float16), mask=s_hi)
        else:
            tl.store(p_ptr + i_lo, p_lo, mask=s_lo)
            tl.store(p_ptr + i_hi, p_hi, mask=s_hi)

        # ---- moments -------------------------------------------------------
        if TIER == 0:
            tl.store(m_ptr + i_lo, m_lo, mask=s_lo)
            tl.store(m_ptr + i_hi, m_hi, mask=s_hi)
            tl.store(v_ptr + i_lo, v_lo, mask=s_lo)
            tl.store(v_ptr + i_hi, v_hi, mask=s_hi)
        elif TIER == 1:
            if SR_M:
                tl.store(m_ptr + i_lo, _sr_bf16(m_lo, r1_lo), mask=s_lo)
                tl.store(m_ptr + i_hi, _sr_bf16(m_hi, r1_hi), mask=s_hi)
                tl.store(v_ptr + i_lo, _sr_bf16(v_lo, r2_lo), mask=s_lo)
                tl.store(v_ptr + i_hi, _sr_bf16(v_hi, r2_hi), mask=s_hi)
            else:
                tl.store(m_ptr + i_lo, _rne_bf16(m_lo), mask=s_lo)
                tl.store(m_ptr + i_hi, _rne_bf16(m_hi), mask=s_hi)
                tl.store(v_ptr + i_lo, _rne_bf16(v_lo), mask=s_lo)
                tl.store(v_ptr + i_hi, _rne_bf16(v_hi), mask=s_hi)
        else:
            a_new = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
            u_new = tl.maximum(tl.max(tl.sqrt(v_lo), axis=1), tl.max(tl.sqrt(v_hi), axis=1))
            a_safe = tl.where(a_new > 0, a_new, 1.0)[:, None]
            u_safe = tl.where(u_new > 0, u_new, 1.0)[:, None]
            nqm_lo = _enc_m(m_lo, a_safe, QM)
            nqm_hi = _enc_m(m_hi, a_safe, QM)
            nqv_lo = _enc_v(v_lo, u_safe, QV)
            nqv_hi = _enc_v(v_hi, u_safe, QV)
            if WRITE_ERR:
                # error of the update direction if this block's state were stored quantized
                a2 = a_new[:, None]
                u2 = u_new[:, None]
                x_lo = m_lo / d_lo
                x_hi = m_hi / d_hi
                y_lo = _dec_m(nqm_lo, a2, QM) / (tl.sqrt(_dec_v(nqv_lo, u2, QV)) / bc2s + eps)
                y_hi = _dec_m(nqm_hi, a2, QM) / (tl.sqrt(_dec_v(nqv_hi, u2, QV)) / bc2s + eps)
                num = tl.sum((x_lo - y_lo) * (x_lo - y_lo), axis=1) + tl.sum((x_hi - y_hi) * (x_hi - y_hi), axis=1)
                den = tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)
                tl.store(err_ptr + rows, num / tl.maximum(den, 1e-30), mask=ok)
            wq = ok
            if HYBRID:
                wq = ok & (slot < 0)
                wh = (ok & hp)[:, None]
                tl.store(pm_ptr + srow, m_lo, mask=wh)
                tl.store(pm_ptr + srow + HALF, m_hi, mask=wh)
                tl.store(pv_ptr + srow, v_lo, mask=wh)
                tl.store(pv_ptr + srow + HALF, v_hi, mask=wh)
            wq2 = wq[:, None]
            tl.store(ms_ptr + rows, a_new, mask=wq)
            tl.store(vs_ptr + rows, u_new, mask=wq)
            if TIER == 2:
                tl.store(m_ptr + i_lo, nqm_lo.to(tl.int8), mask=wq2)
                tl.store(m_ptr + i_hi, nqm_hi.to(tl.int8), mask=wq2)
                tl.store(v_ptr + i_lo, nqv_lo.to(tl.uint8), mask=wq2)
                tl.store(v_ptr + i_hi, nqv_hi.to(tl.uint8), mask=wq2)
            else:
                i_b = rows64[:, None] * HALF + cols[None, :]
                tl.store(m_ptr + i_b, ((nqm_lo + 8) | ((nqm_hi + 8) << 4)).to(tl.uint8), mask=wq2)
                tl.store(v_ptr + i_b, (nqv_lo | (nqv_hi << 4)).to(tl.uint8), mask=wq2)


    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, slot_ptr, pm_ptr, pv_ptr, err_ptr,
        lr_ptr, b1_ptr, b2_ptr, eps_ptr, wd_ptr, step_ptr, skip_ptr,
        N, NBLK, seed,
        TIER: tl.constexpr, HYBRID: tl.constexpr, WRITE_ERR: tl.constexpr,
        HAS_SKIP: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr,
        P_KIND: tl.constexpr,
        BLOCK: tl.constexpr, NB: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        _adamw_body(tl.program_id(0), p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, slot_ptr, pm_ptr, pv_ptr,
                    err_ptr, lr_ptr, b1_ptr, b2_ptr, eps_ptr, wd_ptr, step_ptr, skip_ptr, N, NBLK, seed,
                    TIER, HYBRID, WRITE_ERR, HAS_SKIP, SR_P, SR_M, P_KIND, BLOCK, NB, ROUNDS)

    @triton.jit
    def _float_ptr(addr, KIND: tl.constexpr):
        if KIND == 1:
            return addr.to(tl.pointer_type(tl.bfloat16))
        elif KIND == 2:
            return addr.to(tl.pointer_type(tl.float16))
        else:
            return addr.to(tl.pointer_type(tl.float32))

    @triton.jit
    def _adamw_multi_kernel(
        table_ptr, lr_ptr, b1_ptr, b2_ptr, eps_ptr, wd_ptr, K,
        TIER: tl.constexpr, HYBRID: tl.constexpr, WRITE_ERR: tl.constexpr,
        HAS_SKIP: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr,
        P_KIND: tl.constexpr, G_KIND: tl.constexpr,
        BLOCK: tl.constexpr, NB: tl.constexpr, ROUNDS: tl.constexpr, KP: tl.constexpr,
    ):
        # K parameters in one launch. Row t of the int64 table (16 columns, see _multi_table) holds the
        # addresses of parameter t's tensors, its sizes, seed and first program; program pid
        # finds its row as the last one whose first program is <= pid, then runs exactly the
        # one-parameter kernel's body on that row (so the bits are the same by construction).
        pid = tl.program_id(0)
        ks = tl.arange(0, KP)
        first = tl.load(table_ptr + ks * 16 + 15, mask=ks < K, other=0x7FFFFFFFFFFFFFFF)
        t = tl.sum((first <= pid).to(tl.int32), axis=0) - 1
        row = table_ptr + t.to(tl.int64) * 16
        local = pid - tl.load(row + 15)
        if TIER == 0:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        elif TIER == 1:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.bfloat16))
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.bfloat16))
        elif TIER == 2:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int8))
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        else:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        _adamw_body(local,
                    _float_ptr(tl.load(row + 0), P_KIND), _float_ptr(tl.load(row + 1), G_KIND), m_ptr, v_ptr,
                    tl.load(row + 4).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 5).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 6).to(tl.pointer_type(tl.int32)),
                    tl.load(row + 7).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 8).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 9).to(tl.pointer_type(tl.float32)),
                    lr_ptr, b1_ptr, b2_ptr, eps_ptr, wd_ptr,
                    tl.load(row + 10).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 11).to(tl.pointer_type(tl.float32)),
                    tl.load(row + 12), tl.load(row + 13), tl.load(row + 14).to(tl.int32),
                    TIER, HYBRID, WRITE_ERR, HAS_SKIP, SR_P, SR_M, P_KIND, BLOCK, NB, ROUNDS)


_P_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


if HAS_TRITON:
    @triton.jit
    def _bookkeep_kernel(norm_ptr, step_ptr, skips_ptr, found_ptr):
        # one program, four scalars: what five separate torch launches did per parameter
        n = tl.load(norm_ptr)
        f = tl.where((n != n) | (n == float("inf")), 1.0, 0.0)  # a norm is >= 0: no -inf
        tl.store(found_ptr, f)
        tl.store(skips_ptr, tl.load(skips_ptr) + f)
        tl.store(step_ptr, tl.load(step_ptr) + 1.0 - f)


def step_bookkeeping_(grad_norm: Tensor, step: Tensor, skips: Tensor) -> Tensor:
    """From the gradient's fp32 L2 norm (0-d): ``found_inf`` = 1.0 if it is not finite
    else 0.0 (returned, 0-d fp32); ``skips += found_inf``; ``step += 1 - found_inf``.
    One kernel launch where the Triton kernels run, plain torch ops elsewhere."""
    if uses_triton(step) and grad_norm.dtype == torch.float32 and grad_norm.device == step.device:
        found = torch.empty((), dtype=torch.float32, device=step.device)
        _bookkeep_kernel[(1,)](grad_norm, step, skips, found, num_warps=1)
        return found
    found = torch.logical_not(torch.isfinite(grad_norm)).to(torch.float32)
    skips.add_(found)
    step.add_(1.0 - found)
    return found


def step_bookkeeping_many_(grad_norms: list[Tensor], steps: list[Tensor], skips: list[Tensor]) -> list[Tensor]:
    """:func:`step_bookkeeping_` for many parameters on one device, in a fixed handful of
    launches whatever their number: returns each parameter's ``found_inf`` (0-d fp32 views
    of one vector). Same values as the one-parameter form (0/1 flags, integer counters)."""
    if len(grad_norms) == 1:
        return [step_bookkeeping_(grad_norms[0], steps[0], skips[0])]
    dev = steps[0].device
    n = torch.stack([x if x.device == dev else x.to(dev) for x in grad_norms])
    found = torch.logical_not(torch.isfinite(n)).to(torch.float32)
    flags = list(found.unbind())
    _compat.foreach_add_(skips, flags)
    _compat.foreach_add_(steps, list((1.0 - found).unbind()))
    return flags


def _launch(tier: int, param: Tensor, grad: Tensor, m: Tensor, v: Tensor,
            ms: Optional[Tensor], vs: Optional[Tensor], slot: Optional[Tensor],
            pm: Optional[Tensor], pv: Optional[Tensor], err: Optional[Tensor],
            lr, b1, b2, eps, wd, step, found_inf: Optional[Tensor], seed: int, sr: bool) -> None:
    N = param.numel()
    if N == 0:
        return
    nblk = nblocks(N)
    dummy = m
    grid = (triton.cdiv(nblk, BLOCKS_PER_PROGRAM),)
    _adamw_kernel[grid](
        param, grad, m, v,
        ms if ms is not None else dummy, vs if vs is not None else dummy,
        slot if slot is not None else dummy, pm if pm is not None else dummy,
        pv if pv is not None else dummy, err if err is not None else dummy,
        lr, b1, b2, eps, wd, step, found_inf if found_inf is not None else dummy,
        N, nblk, seed & 0x7FFFFFFF,
        TIER=tier, HYBRID=slot is not None, WRITE_ERR=err is not None,
        HAS_SKIP=found_inf is not None,
        SR_P=bool(sr and param.dtype == torch.bfloat16), SR_M=bool(sr and tier == TIER_BF16),
        P_KIND=_P_KIND[param.dtype], BLOCK=BLOCK, NB=BLOCKS_PER_PROGRAM, ROUNDS=PHILOX_ROUNDS,
        num_warps=4,
    )



_TIER_CODE = {"fp32": TIER_FP32, "bf16": TIER_BF16, "int8": TIER_INT8, "int4": TIER_INT4}
_STATE_KEYS = ("m_codes", "v_codes", "m_scale", "v_scale", "slot", "pool_m", "pool_v", "err")
_MT_MAX = 1024  # parameters per launch (the program -> parameter search loads this many firsts at most)


def _multi_ok(params: list[Tensor], grads: list[Tensor]) -> bool:
    if len(params) < 2 or not uses_triton(params[0]):
        return False
    dev = params[0].device
    return all(type(p) in (Tensor, torch.nn.Parameter) and type(g) is Tensor and p.device == dev
               and p.is_contiguous() for p, g in zip(params, grads))


def _multi_table(tier: str, params, grads, states, found_infs) -> tuple[Tensor, int, list]:
    """The int64 table of ``_adamw_multi_kernel`` on the parameters' device, the number of
    programs, and the tensors that must stay alive until the launch (contiguous gradients)."""
    rows, keep, first = [], [], 0
    for k, (p, g, st) in enumerate(zip(params, grads, states)):
        _check(p, g)
        g = g if g.is_contiguous() else g.contiguous()
        keep.append(g)
        n = p.numel()
        nblk = nblocks(n)
        if tier in ("fp32", "bf16"):
            m, v, ms, vs, slot, pm, pv, err = st["exp_avg"], st["exp_avg_sq"], None, None, None, None, None, None
        else:
            m, v, ms, vs, slot, pm, pv, err = (st.get(x) for x in _STATE_KEYS)
        f = found_infs[k] if found_infs is not None else None
        rows.extend((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                     *(0 if x is None else x.data_ptr() for x in (ms, vs, slot, pm, pv, err)),
                     st["step"].data_ptr(), 0 if f is None else f.data_ptr(),
                     n, nblk, st["seed"] & 0x7FFFFFFF, first))
        first += triton.cdiv(nblk, BLOCKS_PER_PROGRAM)
    table = torch.tensor(rows, dtype=torch.int64)
    if params[0].is_cuda:
        # pageable memory: the copy returns once staged, without waiting for the stream
        table = table.to(params[0].device, non_blocking=True)
    return table, first, keep


def adamw_step_many(tier: str, params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr, betas,
                    eps, weight_decay, found_infs: Optional[list[Tensor]] = None,
                    stochastic_rounding: bool = True, hybrid_bits: int = 4) -> None:
    """:func:`adamw_step_state` for many parameters of one tier that share the
    hyper-parameters (0-d fp32 tensors on the parameters' device): ``states`` as made by
    :func:`init_state` plus HybridAdamW's ``step`` (0-d fp32, the count after this update)
    and ``seed``; ``found_infs``: each parameter's 0-d skip flag, or None for none.

    Where the Triton kernels run and every parameter is a contiguous plain tensor on one
    device, the same dtype and gradient dtype: one launch of ``_adamw_multi_kernel`` per
    ``_MT_MAX`` parameters (the one-parameter kernel's body, bit for bit); otherwise one
    :func:`adamw_step_state` call each."""
    ok = _multi_ok(params, grads) and len({(p.dtype, g.dtype) for p, g in zip(params, grads)}) == 1
    if ok and (params[0].dtype not in _P_KIND or grads[0].dtype not in _P_KIND):
        ok = False
    if not ok:
        for k, (p, g, st) in enumerate(zip(params, grads, states)):
            adamw_step_state(tier, p, g, st, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             step=st["step"], found_inf=None if found_infs is None else found_infs[k],
                             seed=st["seed"], stochastic_rounding=stochastic_rounding, hybrid_bits=hybrid_bits)
        return
    hybrid = tier == "hybrid"
    code = _TIER_CODE[tier] if not hybrid else (TIER_INT8 if hybrid_bits == 8 else TIER_INT4)
    hyper = tuple(_t(x, params[0]) for x in (lr, betas[0], betas[1], eps, weight_decay))
    for lo in range(0, len(params), _MT_MAX):
        sl = slice(lo, lo + _MT_MAX)
        ps, gs, sts = params[sl], grads[sl], states[sl]
        fs = None if found_infs is None else found_infs[sl]
        if len(ps) == 1:
            adamw_step_state(tier, ps[0], gs[0], sts[0], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             step=sts[0]["step"], found_inf=None if fs is None else fs[0], seed=sts[0]["seed"],
                             stochastic_rounding=stochastic_rounding, hybrid_bits=hybrid_bits)
            continue
        table, nprog, keep = _multi_table(tier, ps, gs, sts, fs)
        if nprog == 0:
            continue
        _adamw_multi_kernel[(nprog,)](
            table, *hyper, len(ps),
            TIER=code, HYBRID=hybrid, WRITE_ERR=hybrid or sts[0].get("err") is not None,
            HAS_SKIP=fs is not None,
            SR_P=bool(stochastic_rounding and ps[0].dtype == torch.bfloat16),
            SR_M=bool(stochastic_rounding and code == TIER_BF16),
            P_KIND=_P_KIND[ps[0].dtype], G_KIND=_P_KIND[gs[0].dtype],
            BLOCK=BLOCK, NB=BLOCKS_PER_PROGRAM, ROUNDS=PHILOX_ROUNDS, KP=triton.next_power_of_2(len(ps)),
            num_warps=4,
        )
        del keep, table

# --------------------------------------------------------------------------
# validation shared by the ops
# --------------------------------------------------------------------------

def _check(param: Tensor, grad: Tensor) -> None:
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(
            "unsloth_fx AdamW does not support sparse gradients; use torch.optim.SparseAdam "
            "for this parameter or densify the gradient (grad.to_dense())")
    if param.dtype not in _P_KIND:
        raise TypeError(f"unsloth_fx AdamW: parameter dtype {param.dtype} not supported "
                        "(fp32, bf16, fp16)")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")


def _run(tier: int, param: Tensor, grad: Tensor, ref_kwargs: dict, tensors: tuple, hyper: tuple,
         found_inf, seed: int, sr: bool) -> None:
    _check(param, grad)
    if not uses_triton(param):
        ref.reference_step_(param, grad, **ref_kwargs, lr=hyper[0], beta1=hyper[1], beta2=hyper[2],
                            eps=hyper[3], weight_decay=hyper[4], step=hyper[5], found_inf=found_inf,
                            seed=seed, stochastic_rounding=sr)
        return
    work = param if param.is_contiguous() else param.contiguous()
    g = grad.contiguous()
    _launch(tier, work, g, *tensors, *hyper, found_inf, seed, sr)
    if work is not param:
        param.copy_(work)


# --------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------

def _adamw_step_impl(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                lr: Tensor, beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor,
                step: Tensor, found_inf: Optional[Tensor], seed: int,
                stochastic_rounding: bool) -> None:
    """AdamW step with fp32 or bf16 moments (flat, ``param.numel()`` elements)."""
    tier = TIER_BF16 if exp_avg.dtype == torch.bfloat16 else TIER_FP32
    _run(tier, param, grad,
         dict(tier="bf16" if tier == TIER_BF16 else "fp32", exp_avg=exp_avg, exp_avg_sq=exp_avg_sq),
         (exp_avg, exp_avg_sq, None, None, None, None, None, None),
         (lr, beta1, beta2, eps, weight_decay, step), found_inf, seed, stochastic_rounding)


adamw_step_ = torch.library.custom_op("unsloth_fx::adamw_step_", mutates_args=("param", "exp_avg", "exp_avg_sq"))(_adamw_step_impl)


@adamw_step_.register_fake
def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, found_inf,
      seed, stochastic_rounding):
    return None


def _adamw_step_quant_impl(param: Tensor, grad: Tensor, m_codes: Tensor, m_scale: Tensor,
                      v_codes: Tensor, v_scale: Tensor, err: Optional[Tensor],
                      lr: Tensor, beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor,
                      step: Tensor, found_inf: Optional[Tensor], seed: int, bits: int,
                      stochastic_rounding: bool) -> None:
    """AdamW step with blockwise int8 (bits=8) or int4 (bits=4) moments."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    tier = TIER_INT8 if bits == 8 else TIER_INT4
    _run(tier, param, grad,
         dict(tier="quant", m_codes=m_codes, m_scale=m_scale, v_codes=v_codes, v_scale=v_scale,
              err=err, bits=bits),
         (m_codes, v_codes, m_scale, v_scale, None, None, None, err),
         (lr, beta1, beta2, eps, weight_decay, step), found_inf, seed, stochastic_rounding)


adamw_step_quant_ = torch.library.custom_op("unsloth_fx::adamw_step_quant_",
                         mutates_args=("param", "m_codes", "m_scale", "v_codes", "v_scale", "err"))(_adamw_step_quant_impl)


@adamw_step_quant_.register_fake
def _(param, grad, m_codes, m_scale, v_codes, v_scale, err, lr, beta1, beta2, eps, weight_decay,
      step, found_inf, seed, bits, stochastic_rounding):
    return None


def _adamw_step_hybrid_impl(param: Tensor, grad: Tensor, m_codes: Tensor, m_scale: Tensor,
                       v_codes: Tensor, v_scale: Tensor, slot: Tensor, pool_m: Tensor,
                       pool_v: Tensor, err: Tensor,
                       lr: Tensor, beta1: Tensor, beta2: Tensor, eps: Tensor,
                       weight_decay: Tensor, step: Tensor, found_inf: Optional[Tensor], seed: int,
                       bits: int, stochastic_rounding: bool) -> None:
    """AdamW step where block b uses fp32 row ``slot[b]`` of the pools, or the
    int8/int4 store when ``slot[b] < 0``; writes the per-block update error."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    tier = TIER_INT8 if bits == 8 else TIER_INT4
    _run(tier, param, grad,
         dict(tier="hybrid", m_codes=m_codes, m_scale=m_scale, v_codes=v_codes, v_scale=v_scale,
              slot=slot, pool_m=pool_m, pool_v=pool_v, err=err, bits=bits),
         (m_codes, v_codes, m_scale, v_scale, slot, pool_m, pool_v, err),
         (lr, beta1, beta2, eps, weight_decay, step), found_inf, seed, stochastic_rounding)


adamw_step_hybrid_ = torch.library.custom_op("unsloth_fx::adamw_step_hybrid_",
                         mutates_args=("param", "m_codes", "m_scale", "v_codes", "v_scale",
                                       "pool_m", "pool_v", "err"))(_adamw_step_hybrid_impl)


@adamw_step_hybrid_.register_fake
def _(param, grad, m_codes, m_scale, v_codes, v_scale, slot, pool_m, pool_v, err, lr, beta1,
      beta2, eps, weight_decay, step, found_inf, seed, bits, stochastic_rounding):
    return None


# --------------------------------------------------------------------------
# state allocation and plain Python entry points (optimizer + graph pass)
# --------------------------------------------------------------------------

TIERS = ("fp32", "bf16", "int8", "int4", "hybrid")


def init_state(tier: str, param: Tensor, *, hybrid_bits: int = 4, hybrid_cap: float = 0.1,
               empty=None) -> dict:
    """Zero moment state for ``param`` in ``tier`` (see the module table for bytes).

    ``empty``: optional ``(shape, dtype) -> Tensor`` that allocates each state tensor
    (contents undefined: they are filled here), e.g. a view into one buffer that holds
    an optimizer's whole state; default ``torch.empty`` on ``param``'s device."""
    n = param.numel()
    nblk = nblocks(n)
    dev = param.device

    def new(shape, dtype, value=0):
        t = torch.empty(shape, dtype=dtype, device=dev) if empty is None else empty(shape, dtype)
        return t.fill_(value)

    if tier in ("fp32", "bf16"):
        dt = torch.float32 if tier == "fp32" else torch.bfloat16
        return {"exp_avg": new((n,), dt), "exp_avg_sq": new((n,), dt)}
    bits = {"int8": 8, "int4": 4, "hybrid": hybrid_bits}[tier]
    code_len = nblk * BLOCK if bits == 8 else nblk * HALF
    st = {
        # nibble 8 = code 0 in both halves of a 4-bit byte
        "m_codes": new((code_len,), torch.int8, 0) if bits == 8 else new((code_len,), torch.uint8, 0x88),
        "v_codes": new((code_len,), torch.uint8),
        "m_scale": new((nblk,), torch.float32),
        "v_scale": new((nblk,), torch.float32),
    }
    if tier == "hybrid":
        cap_blocks = int(hybrid_cap * nblk)
        st["slot"] = new((nblk,), torch.int32, -1)
        st["pool_m"] = new((cap_blocks, BLOCK), torch.float32)
        st["pool_v"] = new((cap_blocks, BLOCK), torch.float32)
        st["err"] = new((nblk,), torch.float32)
    return st


def _t(x, ref_t: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x if (x.device == ref_t.device and x.dtype == torch.float32) else x.to(ref_t.device, torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=ref_t.device)


def _hyper(param, lr, betas, eps, weight_decay, step):
    return (_t(lr, param), _t(betas[0], param), _t(betas[1], param), _t(eps, param),
            _t(weight_decay, param), _t(step, param))


def _op(op, impl, param: Tensor, grad: Tensor):
    """The registered op, or its body called directly when nothing traces: a plain
    eager call (e.g. from inside the fused backward's op) then skips the custom-op
    dispatch, about a third of the per-parameter CPU cost of the fused update."""
    plain = (type(param) in (Tensor, torch.nn.Parameter) and type(grad) is Tensor
             and not torch.compiler.is_compiling() and not _compat.dispatch_mode_active())
    return impl if plain else op


def adamw_step_fp32(param, grad, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, step,
                    found_inf=None, seed=0, stochastic_rounding=True):
    """fp32 moments. Floats or 0-d tensors for lr/betas/eps/weight_decay/step."""
    _op(torch.ops.unsloth_fx.adamw_step_, _adamw_step_impl, param, grad)(param, grad, exp_avg, exp_avg_sq,
                                     *_hyper(param, lr, betas, eps, weight_decay, step),
                                     found_inf, seed, stochastic_rounding)


adamw_step_bf16 = adamw_step_fp32  # the dtype of exp_avg selects the tier
adamw_step_bf16.__doc__ = "fp32 or bf16 moments; the dtype of exp_avg selects the tier."


def adamw_step_int8(param, grad, m_codes, m_scale, v_codes, v_scale, *, lr, betas, eps,
                    weight_decay, step, found_inf=None, seed=0, stochastic_rounding=True, err=None):
    _op(torch.ops.unsloth_fx.adamw_step_quant_, _adamw_step_quant_impl, param, grad)(
        param, grad, m_codes, m_scale, v_codes, v_scale, err,
                                           *_hyper(param, lr, betas, eps, weight_decay, step),
                                           found_inf, seed, 8, stochastic_rounding)


def adamw_step_int4(param, grad, m_codes, m_scale, v_codes, v_scale, *, lr, betas, eps,
                    weight_decay, step, found_inf=None, seed=0, stochastic_rounding=True, err=None):
    _op(torch.ops.unsloth_fx.adamw_step_quant_, _adamw_step_quant_impl, param, grad)(
        param, grad, m_codes, m_scale, v_codes, v_scale, err,
                                           *_hyper(param, lr, betas, eps, weight_decay, step),
                                           found_inf, seed, 4, stochastic_rounding)


def adamw_step_hybrid(param, grad, m_codes, m_scale, v_codes, v_scale, slot, pool_m, pool_v, err,
                      *, bits, lr, betas, eps, weight_decay, step, found_inf=None, seed=0,
                      stochastic_rounding=True):
    _op(torch.ops.unsloth_fx.adamw_step_hybrid_, _adamw_step_hybrid_impl, param, grad)(
        param, grad, m_codes, m_scale, v_codes, v_scale, slot,
                                            pool_m, pool_v, err,
                                            *_hyper(param, lr, betas, eps, weight_decay, step),
                                            found_inf, seed, bits, stochastic_rounding)


def adamw_step_state(tier: str, param: Tensor, grad: Tensor, state: dict, *, lr, betas, eps,
                     weight_decay, step, found_inf=None, seed=0, stochastic_rounding=True,
                     hybrid_bits: int = 4) -> None:
    """Dispatch on ``tier`` with a state dict made by :func:`init_state`."""
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step,
              found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)
    if tier in ("fp32", "bf16"):
        adamw_step_fp32(param, grad, state["exp_avg"], state["exp_avg_sq"], **kw)
    elif tier == "int8":
        adamw_step_int8(param, grad, state["m_codes"], state["m_scale"], state["v_codes"],
                        state["v_scale"], **kw)
    elif tier == "int4":
        adamw_step_int4(param, grad, state["m_codes"], state["m_scale"], state["v_codes"],
                        state["v_scale"], **kw)
    elif tier == "hybrid":
        adamw_step_hybrid(param, grad, state["m_codes"], state["m_scale"], state["v_codes"],
                          state["v_scale"], state["slot"], state["pool_m"], state["pool_v"],
                          state["err"], bits=hybrid_bits, **kw)
    else:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


# --------------------------------------------------------------------------
# the gate (every K steps, outside the hot loop; plain torch ops)
# --------------------------------------------------------------------------

def hybrid_regate_(state: dict, *, bits: int, promote: float, demote: float) -> dict:
    """Re-decide which blocks keep fp32 moments, from the per-block ``err``
    the last hybrid step wrote (relative squared error of the update direction
    had the block's new state been stored quantized).

    Hysteresis: a quantized block is promoted when ``err > promote``; an fp32
    block is demoted only when ``err < demote`` (``demote < promote``).  At
    most ``pool_m.shape[0]`` blocks (the cap) are fp32: the largest errors
    win.  State moves between stores (dequantize on promotion, quantize on
    demotion).  Returns counts {"fp32_blocks", "promoted", "demoted"}.
    """
    slot, err = state["slot"], state["err"]
    pool_m, pool_v = state["pool_m"], state["pool_v"]
    cap = pool_m.shape[0]
    nblk = slot.numel()
    is_hp = slot >= 0
    want = torch.where(is_hp, err >= demote, err > promote)
    if int(want.sum()) > cap:
        score = torch.where(want, err, torch.full_like(err, -1.0))
        keep = torch.topk(score, cap).indices if cap > 0 else score.new_zeros(0, dtype=torch.long)
        want = torch.zeros_like(want)
        want[keep] = True
    promoted = want & ~is_hp
    demoted = is_hp & ~want
    mc = ref.unpack_m(state["m_codes"], bits)
    vc = ref.unpack_v(state["v_codes"], bits)
    # demote: quantize the fp32 rows into the low store
    d_idx = demoted.nonzero().flatten()
    if d_idx.numel():
        rows = slot[d_idx].long()
        qm, am = ref.encode_m(pool_m[rows], bits)
        qv, uv = ref.encode_v(pool_v[rows], bits)
        mc[d_idx] = qm
        vc[d_idx] = qv
        state["m_scale"][d_idx] = am
        state["v_scale"][d_idx] = uv
        state["m_codes"].copy_(ref.pack_m(mc, bits))
        state["v_codes"].copy_(ref.pack_v(vc, bits))
    # new pool: kept rows move, promoted rows are dequantized
    n_idx = want.nonzero().flatten()
    new_m = torch.zeros_like(pool_m)
    new_v = torch.zeros_like(pool_v)
    if n_idx.numel():
        stay = is_hp[n_idx]
        old_rows = slot[n_idx].clamp(min=0).long()
        dm = ref.decode_m(mc[n_idx], state["m_scale"][n_idx], bits)
        dv = ref.decode_v(vc[n_idx], state["v_scale"][n_idx], bits)
        new_m[: n_idx.numel()] = torch.where(stay[:, None], pool_m[old_rows], dm)
        new_v[: n_idx.numel()] = torch.where(stay[:, None], pool_v[old_rows], dv)
    new_slot = torch.full((nblk,), -1, dtype=torch.int32, device=slot.device)
    new_slot[n_idx] = torch.arange(n_idx.numel(), dtype=torch.int32, device=slot.device)
    pool_m.copy_(new_m)
    pool_v.copy_(new_v)
    slot.copy_(new_slot)
    return {"fp32_blocks": int(n_idx.numel()), "promoted": int(promoted.sum()),
            "demoted": int(demoted.sum())}


def state_nbytes(state: dict) -> int:
    """Bytes held by the tensors of one parameter's moment state."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
