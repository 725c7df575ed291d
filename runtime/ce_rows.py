"""Triton row kernels for the fused LM head + CE's per-chunk softmax work (experimental; off by default).

The torch path of :func:`unsloth_fx.runtime.linear_cross_entropy._forward_impl` runs seven kernels over
one chunk's ``[c, V]`` logits ``x`` (weight dtype) and keeps an fp32 ``[c, V]`` buffer of exponentials
beside them: ``26 x c x V`` bytes moved for a bf16 weight (amax 2, the fp32 subtraction 6, exp 8, sum 4,
the gradient 6; the gather and scatter are small). These two kernels do the same arithmetic in
``8 x c x V`` bytes (two reads for the statistics, one read and one write for the gradient), with no fp32
buffer:

- :func:`row_stats`: per row, ``m = max(x)`` (exact, as ``amax``; an infinite max shifts by 0, as
  ``torch.logsumexp`` does) in one pass, then ``s = sum(exp(x - m))`` in fp32 in a second, and
  ``lse = log(s) + m``: the torch path's arithmetic, with another summation order;
- :func:`row_grad_`: ``x <- exp(x - m) * (k / s) - k * onehot(target)``, in place in ``x``'s dtype
  (``k`` is the token's loss weight: ``valid / n_valid`` for mean, ``valid`` for sum): the torch path
  computes ``(exp(x - m) - s * onehot) * (k / s)``, equal up to rounding.

For r1-distill-qwen-1.5b (c = 256 tokens of 2048 at 8 chunks, V = 151,936, bf16) that is 0.31 GB moved per
chunk instead of 1.01 GB (5.6 GB less a step, about 2 ms at the H100's 2.8-3.0 TB/s), and 156 MB less memory
inside the op (the fp32 buffer), whose forward is where
the 7 GiB product path peaks (docs/benchmarks.md, fourteenth session). **Not measured on a GPU yet.**

Used when ``UNSLOTH_FX_LCE_KERNEL=triton`` is set and the logits are on CUDA (or on CPU under
``TRITON_INTERPRET=1``, how the tests run it); :func:`wanted` says so, and
``linear_cross_entropy.workspace_bytes`` counts the op's buffers by the same switch.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .adamw import HAS_TRITON, tl, triton, uses_triton  # triton is optional on CPU-only installs (None there)

ENV = "UNSLOTH_FX_LCE_KERNEL"
BLOCK = 4096  # logits per program iteration (a row of 151,936 takes 38)


def requested() -> bool:
    """Whether ``UNSLOTH_FX_LCE_KERNEL`` asks for the Triton row kernels ("triton"; "torch" or unset: no)."""
    v = os.environ.get(ENV, "torch").strip().lower()
    if v not in ("torch", "triton", ""):
        raise ValueError(f"{ENV}={v!r}: expected 'torch' (the default) or 'triton'")
    return v == "triton" and HAS_TRITON


def wanted(x: Tensor) -> bool:
    """Whether the op runs these kernels on ``x``: requested, and ``x`` is on CUDA (or CPU under the interpreter)."""
    return requested() and uses_triton(x)


if HAS_TRITON:
    from .adamw import _rne_bf16  # the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest

    @triton.jit
    def _stats_kernel(x_ptr, lse_ptr, m_ptr, s_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
            mx = tl.maximum(mx, x)
        m = tl.max(mx, 0)
        m = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
            acc += tl.exp(x - m)
        s = tl.sum(acc, 0)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(lse_ptr + row, tl.log(s) + m)

    @triton.jit
    def _grad_kernel(x_ptr, tgt_ptr, m_ptr, s_ptr, k_ptr, V, stride, BLOCK: tl.constexpr, BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        m = tl.load(m_ptr + row)
        k = tl.load(k_ptr + row)
        scale = k / tl.load(s_ptr + row)
        t = tl.load(tgt_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - m) * scale - tl.where(cols == t, k, 0.0)
            if BF16:
                tl.store(base + cols, _rne_bf16(g), mask=cols < V)
            else:
                tl.store(base + cols, g.to(x_ptr.dtype.element_ty), mask=cols < V)


def _launch(kernel, rows: int, *args, **meta) -> None:
    """Run ``kernel`` over ``rows`` programs (one seam, so a test can tell the kernels' allocations, none on a GPU,
    from the interpreter's copies of their arguments)."""
    kernel[(rows,)](*args, **meta)


def _check(x: Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"ce_rows: expected [rows, vocab] logits with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def row_stats(x: Tensor, lse_out: Tensor) -> tuple[Tensor, Tensor]:
    """Write each row's log-sum-exp of ``x`` (fp32) into ``lse_out`` ([rows] fp32, may be a slice); return the
    rows' shift ``m`` and exponential sum ``s`` (fp32 [rows]) for :func:`row_grad_`."""
    _check(x)
    rows, V = x.shape
    m = torch.empty(rows, dtype=torch.float32, device=x.device)
    s = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _launch(_stats_kernel, rows, x, lse_out, m, s, V, x.stride(0), BLOCK=min(BLOCK, triton.next_power_of_2(V)),
                num_warps=8)
    return m, s


def row_grad_(x: Tensor, target: Tensor, m: Tensor, s: Tensor, k: Tensor) -> Tensor:
    """``x <- exp(x - m) * (k / s) - k * onehot(target)`` row by row, in place; returns ``x``. ``target``: int64
    [rows] (or [rows, 1]) column per row; ``k``: fp32 [rows] loss weight per row (0 for ignored tokens)."""
    _check(x)
    rows, V = x.shape
    if rows:
        _launch(_grad_kernel, rows, x, target.reshape(-1), m, s, k.reshape(-1), V, x.stride(0),
                BLOCK=min(BLOCK, triton.next_power_of_2(V)), BF16=x.dtype == torch.bfloat16, num_warps=8)
    return x
