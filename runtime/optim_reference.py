"""Pure-PyTorch reference for the fused AdamW kernels in ``adamw.py``.

Same state layout, same arithmetic order, same codes and the same
counter-based random numbers (Philox4x32 with ``PHILOX_ROUNDS`` rounds, the
generator behind ``tl.randint4x``) as the Triton kernels, so the interpreter
run of a kernel can be compared against this file element by element.  It is
also what the ops run on CPU tensors when ``TRITON_INTERPRET`` is not set.

State layout for one parameter of ``N`` elements, ``nblk = ceil(N / BLOCK)``:

* fp32 / bf16 tiers: ``exp_avg``, ``exp_avg_sq`` flat ``[N]`` tensors.
* int8 tier: ``m_codes`` int8 ``[nblk * BLOCK]``, ``v_codes`` uint8
  ``[nblk * BLOCK]``, ``m_scale`` / ``v_scale`` fp32 ``[nblk]``.
* int4 tier: ``m_codes`` / ``v_codes`` uint8 ``[nblk * BLOCK / 2]``: byte ``j``
  of block ``b`` holds element ``j`` in the low nibble and element
  ``j + BLOCK/2`` in the high nibble.
* hybrid: an int8 or int4 store for every block, plus ``slot`` int32
  ``[nblk]`` (-1: quantized, k >= 0: row k of the fp32 pools ``pool_m`` /
  ``pool_v`` ``[cap_blocks, BLOCK]``) and ``err`` fp32 ``[nblk]``.

Codes (Q = 127 / 7 for the first moment, 255 / 15 for the second):

* first moment, signed, per-block absmax ``a``:
  ``q = round(sqrt(|m| / a) * Q) * sign(m)``, ``m = sign(q) (|q|/Q)^2 a``
  (a square-law code: more levels near zero than a linear one).
* second moment, per-block ``umax = max sqrt(v)``:
  ``q = clamp(round(sqrt(sqrt(v)/umax) * (Q+1) - 1), 0, Q)``,
  ``sqrt(v) = ((q+1)/(Q+1))^2 umax``.  The code cannot represent zero (the
  smallest value is ``umax / (Q+1)^2``), so a quantized denominator never
  collapses to ``eps`` and blows the update up.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
HALF = BLOCK // 2
PHILOX_ROUNDS = 7  # Philox4x32-7 passes BigCrush (Salmon et al. 2011); 10 is the Random123 default
_FMAX = 3.4028234663852886e38

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57

QM = {8: 127, 4: 7}
QV = {8: 255, 4: 15}


def nblocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


# --------------------------------------------------------------------------
# Philox4x32 on int64 tensors (bit-exact with triton.language.random)
# --------------------------------------------------------------------------

def _umulhi(a: int, b: Tensor) -> Tensor:
    # high 32 bits of a*b for a < 2**32 constant, b uint32 in int64; split a to stay < 2**63
    ah, al = a >> 16, a & 0xFFFF
    return ((b * ah) + ((b * al) >> 16)) >> 16


def philox4x32(seed: int, c0: Tensor, c1: Tensor, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 with counters (c0, c1, 0, 0) and key (seed lo, seed hi).

    ``c0``/``c1`` are int64 tensors holding uint32 values. Returns four int64
    tensors of uint32 values, identical to ``tl.randint4x(seed, (c1 << 32) | c0)``.
    """
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = c0 & _M32
    c1 = c1 & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        _c0, _c2 = c0, c2
        c0 = _umulhi(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = _umulhi(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = (_c2 * _PHILOX_ROUND_B) & _M32
        c3 = (_c0 * _PHILOX_ROUND_A) & _M32
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def stochastic_round_bf16(x: Tensor, r: Tensor) -> Tensor:
    """Round fp32 ``x`` to bf16, up with probability equal to the dropped fraction.

    ``r`` holds uniform uint32 values (int64 tensor); its low 16 bits are added
    to the low 16 bits of ``x``'s bit pattern, then truncated.  Unbiased:
    E[result] = x for finite x away from the overflow threshold.
    """
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    bits = (bits + (r & 0xFFFF)) & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).to(torch.bfloat16)


# --------------------------------------------------------------------------
# codes
# --------------------------------------------------------------------------

def _round_pos(x: Tensor) -> Tensor:
    # same as the kernel: truncate x + 0.5 toward zero (x >= 0)
    return (x + 0.5).to(torch.int32)


def encode_m(m: Tensor, bits: int):
    """m: [k, BLOCK] fp32 -> (signed int32 codes [k, BLOCK], absmax [k])."""
    Q = QM[bits]
    a = m.abs().amax(dim=1)
    a_safe = torch.where(a > 0, a, torch.ones_like(a))
    r = m.abs() / a_safe[:, None]
    q = _round_pos(torch.sqrt(r) * float(Q))
    q = torch.where(m < 0, -q, q)
    return q, a


def decode_m(q: Tensor, a: Tensor, bits: int) -> Tensor:
    Q = QM[bits]
    t = q.abs().float() * (1.0 / Q)
    val = t * t * a[:, None]
    return torch.where(q < 0, -val, val)


def encode_v(v: Tensor, bits: int):
    """v: [k, BLOCK] fp32 (>= 0) -> (int32 codes in [0, Q], umax [k])."""
    Q = QV[bits]
    u = torch.sqrt(v)
    umax = u.amax(dim=1)
    um_safe = torch.where(umax > 0, umax, torch.ones_like(umax))
    r = u / um_safe[:, None]
    q = _round_pos(torch.clamp(torch.sqrt(r) * float(Q + 1) - 1.0, min=0.0))
    q = torch.clamp(q, max=Q)
    return q, umax


def decode_v(q: Tensor, umax: Tensor, bits: int) -> Tensor:
    Q = QV[bits]
    t = (q.float() + 1.0) * (1.0 / (Q + 1))
    u = t * t * umax[:, None]
    return u * u


def pack_m(q: Tensor, bits: int) -> Tensor:
    """signed codes [k, BLOCK] -> storage (int8 [k*BLOCK] or packed uint8 [k*HALF])."""
    if bits == 8:
        return q.to(torch.int8).reshape(-1)
    n = (q + 8).to(torch.int32)
    return (n[:, :HALF] | (n[:, HALF:] << 4)).to(torch.uint8).reshape(-1)


def unpack_m(s: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return s.view(-1, BLOCK).to(torch.int32)
    b = s.view(-1, HALF).to(torch.int32)
    return torch.cat([(b & 15) - 8, (b >> 4) - 8], dim=1)


def pack_v(q: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return q.to(torch.uint8).reshape(-1)
    n = q.to(torch.int32)
    return (n[:, :HALF] | (n[:, HALF:] << 4)).to(torch.uint8).reshape(-1)


def unpack_v(s: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return s.view(-1, BLOCK).to(torch.int32)
    b = s.view(-1, HALF).to(torch.int32)
    return torch.cat([b & 15, b >> 4], dim=1)


# --------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------

def _f32(x, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def _scalars(lr, beta1, beta2, eps, weight_decay, step, device):
    lr, b1, b2, eps, wd, step = (_f32(x, device) for x in (lr, beta1, beta2, eps, weight_decay, step))
    wdf = 1.0 - lr * wd
    bc1 = 1.0 - torch.exp2(step * torch.log2(b1))
    bc2 = 1.0 - torch.exp2(step * torch.log2(b2))
    return dict(lr=lr, b1=b1, b2=b2, eps=eps, wdf=wdf, step_size=lr / bc1, bc2s=torch.sqrt(bc2), step=step)


def _padded(x: Tensor, total: int) -> Tensor:
    flat = x.detach().reshape(-1).float()
    if flat.numel() < total:
        flat = torch.cat([flat, flat.new_zeros(total - flat.numel())])
    return flat.view(-1, BLOCK)


def _random(seed: int, step: Tensor, n_total: int, device):
    idx = torch.arange(n_total, device=device, dtype=torch.int64)
    c1 = step.to(torch.int64).expand(n_total)
    return philox4x32(seed, idx, c1)


def reference_step_(
    param: Tensor, grad: Tensor, *, tier: str,
    exp_avg: Tensor | None = None, exp_avg_sq: Tensor | None = None,
    m_codes: Tensor | None = None, m_scale: Tensor | None = None,
    v_codes: Tensor | None = None, v_scale: Tensor | None = None,
    slot: Tensor | None = None, pool_m: Tensor | None = None, pool_v: Tensor | None = None,
    err: Tensor | None = None,
    lr, beta1, beta2, eps, weight_decay, step, found_inf: Tensor | None = None,
    seed: int = 0, bits: int = 8, stochastic_rounding: bool = True,
) -> None:
    """One AdamW step for one parameter, in place, matching the Triton kernel.

    ``tier`` is "fp32" | "bf16" (exp_avg/exp_avg_sq), "quant" (codes+scales)
    or "hybrid" (codes+scales+slot+pools).  ``step`` is the step number after
    this update (>= 1).  Blocks whose gradient holds a NaN/inf, and the whole
    parameter when ``found_inf`` is nonzero, are left untouched.
    """
    dev = param.device
    N = param.numel()
    nblk = nblocks(N)
    total = nblk * BLOCK
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step, dev)
    g = _padded(grad, total)
    p = _padded(param, total)
    elem = (torch.arange(total, device=dev) < N).view(nblk, BLOCK)

    ok = torch.isfinite(g).all(dim=1)
    if found_inf is not None:
        ok = ok & (found_inf.to(dev).reshape(()) == 0)

    if tier in ("fp32", "bf16"):
        m = _padded(exp_avg, total)
        v = _padded(exp_avg_sq, total)
    else:
        m = decode_m(unpack_m(m_codes, bits), m_scale, bits)
        v = decode_v(unpack_v(v_codes, bits), v_scale, bits)
        if tier == "hybrid":
            hp = slot >= 0
            rows = slot.clamp(min=0).long()
            m = torch.where(hp[:, None], pool_m[rows], m)
            v = torch.where(hp[:, None], pool_v[rows], v)

    p = p * s["wdf"]
    m = s["b1"] * m + (1.0 - s["b1"]) * g
    v = s["b2"] * v + (1.0 - s["b2"]) * g * g
    denom = torch.sqrt(v) / s["bc2s"] + s["eps"]
    p = p - s["step_size"] * (m / denom)

    rnd = None
    if stochastic_rounding and (param.dtype == torch.bfloat16 or tier == "bf16"):
        rnd = _random(seed, s["step"], total, dev)

    # weights
    okm = ok[:, None] & elem
    if param.dtype == torch.bfloat16 and stochastic_rounding:
        p_new = stochastic_round_bf16(p.reshape(-1), rnd[0]).view(nblk, BLOCK)
    else:
        p_new = p.to(param.dtype)
    old = _padded(param, total).to(param.dtype)
    out = torch.where(okm, p_new, old).reshape(-1)[:N]
    param.copy_(out.view_as(param))

    if tier in ("fp32", "bf16"):
        if tier == "bf16" and stochastic_rounding:
            m_new = stochastic_round_bf16(m.reshape(-1), rnd[1]).view(nblk, BLOCK)
            v_new = stochastic_round_bf16(v.reshape(-1), rnd[2]).view(nblk, BLOCK)
        else:
            m_new, v_new = m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)
        m_old = _padded(exp_avg, total).to(exp_avg.dtype)
        v_old = _padded(exp_avg_sq, total).to(exp_avg_sq.dtype)
        exp_avg.copy_(torch.where(okm, m_new, m_old).reshape(-1)[:N].view_as(exp_avg))
        exp_avg_sq.copy_(torch.where(okm, v_new, v_old).reshape(-1)[:N].view_as(exp_avg_sq))
        return

    qm, am = encode_m(m, bits)
    qv, uv = encode_v(v, bits)
    if err is not None:
        u = m / denom
        mq = decode_m(qm, am, bits)
        vq = decode_v(qv, uv, bits)
        uq = mq / (torch.sqrt(vq) / s["bc2s"] + s["eps"])
        num = ((u - uq) ** 2).sum(dim=1)
        den = (u * u).sum(dim=1)
        e = num / torch.clamp(den, min=1e-30)
        err.copy_(torch.where(ok, e, err))

    wq = ok
    if tier == "hybrid":
        hp = slot >= 0
        wq = ok & ~hp
        rows = slot.clamp(min=0).long()
        wp = ok & hp
        pool_m[rows[wp]] = m[wp]
        pool_v[rows[wp]] = v[wp]
    old_qm = unpack_m(m_codes, bits)
    old_qv = unpack_v(v_codes, bits)
    m_codes.copy_(pack_m(torch.where(wq[:, None], qm, old_qm), bits))
    v_codes.copy_(pack_v(torch.where(wq[:, None], qv, old_qv), bits))
    m_scale.copy_(torch.where(wq, am, m_scale))
    v_scale.copy_(torch.where(wq, uv, v_scale))
