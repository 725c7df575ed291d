"""Fused LM head + cross-entropy that never holds the full ``[tokens, vocab]`` logits.

``torch.ops.unsloth_fx.linear_cross_entropy(hidden, weight, labels, ignore_index,
chunks, chunk_size, reduction, compute_grad, grad_weight_accum) -> (loss, grad_hidden, grad_weight)``

computes ``cross_entropy((hidden @ weight.T).float(), labels)`` the way
transformers' ``ForCausalLMLoss`` does (logits in the weight's dtype, then
upcast to fp32; ``ignore_index`` tokens contribute nothing; ``mean`` divides by
the number of non-ignored tokens) one chunk of tokens at a time. Only one
chunk's logits (``chunk_tokens x vocab``, fp32 plus one copy in the input dtype)
exist at any moment.

Gradients are computed in the forward, chunk by chunk, and returned as extra
outputs that autograd saves; backward only scales them by the incoming
gradient, in place when it runs eagerly (see :func:`_backward`: the op's
``grad_hidden`` / ``grad_weight`` outputs are therefore overwritten by backward;
read them before). Compiled, the traced backward emits :func:`lce_grad_scale`
and the ``inplace_saved_grad_scale`` pass makes it in place too (``scale_``): the
saved gradients are consumed there as well, and a second backward through the
same graph (``retain_graph=True``) raises (the saved tensor's version changed). Why this and not "save the inputs, recompute in backward":

- FLOPs: computing the gradients in the forward costs the same three matmuls
  as unchunked training (logits, grad_hidden, grad_weight). Recomputing in
  backward adds a fourth (the logits again): +33% on the LM head, about +5%
  of a training step for R1-Distill-Qwen-1.5B (vocab 151,936 x hidden 1,536),
  which alone would eat the whole throughput allowance.
- Memory: what is kept from forward to backward is ``grad_hidden`` (the size of
  ``hidden``) and ``grad_weight`` (the size of the LM-head weight). Unchunked
  training creates that same ``grad_weight`` at the start of backward, when
  every activation is still alive, so the peak does not grow; ``grad_hidden``
  replaces the ``hidden`` activation the linear would have saved.

``grad_weight_accum`` says where ``grad_weight`` is summed over the chunks (it only matters for a
bf16/fp16 weight; an fp32 weight is always summed in place in fp32):

- ``"fp32"`` (the op's default): each chunk's ``g.T @ h`` (rounded to the weight dtype by the
  matmul) is added into a ``vocab x hidden`` fp32 buffer, cast once at the end. Costs one fp32
  ``vocab x hidden`` buffer (890 MiB for R1-Distill-Qwen-1.5B, 2.03 GiB for the 7B) plus, at the
  end, the cast copy, next to every forward activation.
- ``"weight_dtype"``: ``grad_weight.addmm_(g.T, h)`` straight into the weight-dtype output: no extra
  buffer (saves 4 bytes x vocab x hidden), but the running sum is rounded once per chunk. Measured
  on CPU (bf16, 4096 tokens, vocab 8192, hidden 256; relative Frobenius error against fp64): one
  unchunked matmul 1.66e-3; ``"fp32"`` 2.35e-3 at 4-16 chunks; ``"weight_dtype"`` 2.62e-3 / 3.53e-3
  / 4.84e-3 at 4 / 8 / 16 chunks (bf16's unit roundoff is 3.9e-3). The
  ``fuse_linear_cross_entropy`` pass uses this mode by default (it only runs to save memory).

The exact alternative (fp32 sums per vocabulary slice) needs each token's log-sum-exp before any
slice's gradient, i.e. a second logits matmul: +1/3 of the LM head's FLOPs (2 x tokens x vocab x
hidden more; about +5% of a training step for R1-Distill-Qwen-1.5B); not implemented.

Conventions: ``hidden`` is ``[..., H]``, ``labels`` has one entry per row of
``hidden`` (any shape with that many elements; the label *shift* is done by
the caller, as HF does before calling the loss). ``chunks`` splits the tokens
into that many near-equal chunks (clamped to the token count); ``chunk_size >
0`` instead fixes the tokens per chunk. ``reduction`` is ``"mean"`` or
``"sum"``. With every token ignored, ``mean`` gives NaN (0/0, as
``torch.nn.functional.cross_entropy`` and therefore HF do) while the gradients
are exactly zero, again as in HF. ``compute_grad=False`` skips the gradient
work (inference) and returns empty gradient tensors; calling backward then
raises.

:func:`patch_causal_lm` makes a transformers ``*ForCausalLM`` stop returning
``logits`` when it computes a training loss, so nothing outside the loss keeps
the full logits alive (see docs/chunking.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import ce_rows

_REDUCTIONS = ("mean", "sum")
GRAD_WEIGHT_ACCUM = ("fp32", "weight_dtype")
_BLOCK = 512  # CUDA caching allocator rounding (bytes), as unsloth_fx.memory.model.BLOCK


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunks: int, chunk_size: int,
           reduction: str, grad_weight_accum: str = "fp32") -> None:
    """Shape / argument checks shared by the real and fake kernels (errors name the fix)."""
    if grad_weight_accum not in GRAD_WEIGHT_ACCUM:
        raise ValueError(f"linear_cross_entropy: grad_weight_accum={grad_weight_accum!r} is not one of "
                         f"{GRAD_WEIGHT_ACCUM}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r} is not one of {_REDUCTIONS}")
    if chunks < 1:
        raise ValueError(f"linear_cross_entropy: chunks={chunks} must be >= 1")
    if chunk_size < 0:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 0 (0: derive from chunks)")
    if weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} does not end in weight's hidden size {weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64/int32, got {labels.dtype}")
    tokens = hidden.numel() // weight.shape[1] if weight.shape[1] else 0
    torch._check(
        labels.numel() == tokens,
        lambda: f"linear_cross_entropy: {labels.numel()} labels for {tokens} hidden rows; shift/flatten labels first",
    )


def chunk_tokens(tokens: int, chunks: int, chunk_size: int) -> int:
    """Tokens per chunk: ``chunk_size`` if > 0, else ``ceil(tokens / chunks)``; at least 1."""
    if chunk_size > 0:
        return chunk_size
    return max(1, math.ceil(tokens / max(1, chunks)))


def _blocks(nbytes: int) -> int:
    return -(-nbytes // _BLOCK) * _BLOCK


def workspace_bytes(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, chunks: int, chunk_size: int = 0,
                    compute_grad: bool = True, grad_weight_accum: str = "fp32", rows_kernel: bool | None = None) -> int:
    """Peak bytes the op holds while it runs, beyond its inputs, *including its outputs* as they
    are built (they are allocated inside the op); each buffer rounded to 512-byte blocks as the
    CUDA caching allocator does. From :func:`_forward_impl`, for ``c`` = :func:`chunk_tokens`
    tokens per chunk, ``s`` = the weight dtype's size, ``T`` tokens, ``V`` vocab, ``H`` hidden:

    - ``[T]`` bookkeeping (int64 targets, bool masks, fp32 lse / target logits / weights) and scalars:
      at most 5 buffers of ``T x 8`` bytes and 8 single blocks alive at once (each rounded);
    - with gradients: ``grad_hidden`` ``T x H x s`` and the ``grad_weight`` buffer: ``V x H x 4``
      (``"fp32"``) or ``V x H x s`` (``"weight_dtype"``, or an fp32 weight);
    - inside a chunk, the larger of: logits ``c x V x s`` + the fp32 exponentials ``c x V x 4``
      (one fp32 buffer when ``s == 4``), and, in ``"fp32"`` mode with ``s < 4``, the gradient
      logits ``c x V x s`` + that chunk's ``g.T @ h`` product ``V x H x s`` being added;
    - at the end in ``"fp32"`` mode with ``s < 4``: the fp32 buffer plus its cast ``V x H x s``.

    ``rows_kernel`` (None: :func:`ce_rows.requested`, the ``UNSLOTH_FX_LCE_KERNEL`` switch the op reads): the
    Triton row kernels replace the fp32 exponentials by two fp32 ``[c]`` row statistics.
    """
    if rows_kernel is None:
        rows_kernel = ce_rows.requested()
    s = torch.empty((), dtype=dtype, device="meta").element_size()
    c = min(chunk_tokens(tokens, chunks, chunk_size), max(tokens, 1))
    fixed = 5 * _blocks(tokens * 8) + 8 * _BLOCK
    if tokens == 0:
        return fixed
    exps = _blocks(c * vocab * s) + (2 * _blocks(c * 4) if rows_kernel else 0 if s == 4 else _blocks(c * vocab * 4))
    if not compute_grad:
        return fixed + exps
    split = s < 4 and grad_weight_accum == "fp32"
    acc = _blocks(vocab * hidden * (4 if split else s))
    grads = _blocks(tokens * hidden * s) + acc
    in_chunk = max(exps, _blocks(c * vocab * s) + _blocks(vocab * hidden * s)) if split else exps
    at_end = _blocks(vocab * hidden * s) if split else 0
    return fixed + grads + max(in_chunk, at_end)


def _forward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunks: int,
    chunk_size: int,
    reduction: str,
    compute_grad: bool,
    grad_weight_accum: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real kernel of the op (a plain function so tests can count the aten ops it runs).

    Per chunk of ``c`` tokens (``V`` = vocab; ``x`` = the logits in the weight dtype):
    ``x = h @ W.T``; ``m = amax(x)`` (exact in the weight dtype); ``e = exp(x - m)`` in one fp32
    buffer (``x - m`` promotes to fp32, which equals ``x.float() - m``, so no separate fp32 copy of
    the logits); ``lse = log(sum(e)) + m`` (the same arithmetic ``torch.logsumexp`` does, without its
    second ``c x V`` temporary); ``d loss/d logits = (e / sum(e) - onehot) * valid * scale`` is written
    straight into the dead ``x`` buffer (bf16/fp16) or in place (fp32). Per-token ``lse`` and target
    logits go into ``[tokens]`` buffers and are reduced once at the end. Peak inside a chunk:
    ``c x V x logit_bytes(dtype)`` (fp32 buffer + weight-dtype buffer), as ``logit_bytes`` states.
    All the op's buffers: :func:`workspace_bytes`.
    """
    _check(hidden, weight, labels, chunks, chunk_size, reduction, grad_weight_accum)
    H = weight.shape[1]
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1).to(torch.int64)
    T, V = h2.shape[0], weight.shape[0]
    dev = h2.device
    valid = y != ignore_index
    if T:
        in_range = ~valid | ((y >= 0) & (y < V))
        torch._assert_async(in_range.all(), "linear_cross_entropy: a label is outside [0, vocab) and not ignore_index")
    n_valid = valid.sum()
    tgt = torch.where(valid, y, 0)[:, None]  # ignored tokens gather / scatter at column 0, weighted by 0
    validf = valid.to(torch.float32)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    target_logit = torch.empty(T, dtype=torch.float32, device=dev)
    fp32_weight = weight.dtype == torch.float32
    # sum grad_weight in place in the weight dtype (always so for an fp32 weight)
    in_place = fp32_weight or grad_weight_accum == "weight_dtype"
    if compute_grad:
        # Gradient weight per token: valid / max(n, 1) for mean (all-ignored batches get zero gradient
        # instead of 0/0), valid for sum.
        coef = validf / n_valid.clamp(min=1).to(torch.float32) if reduction == "mean" else validf
        grad_h = torch.empty_like(h2)
        grad_w = torch.zeros(weight.shape, dtype=weight.dtype if in_place else torch.float32, device=weight.device)
    wt = weight.t()
    step = chunk_tokens(T, chunks, chunk_size)
    rows_kernel = ce_rows.wanted(h2)
    for s in range(0, T, step):
        e = min(s + step, T)
        hc, tc = h2[s:e], tgt[s:e]
        x = torch.mm(hc, wt)  # HF: lm_head in the weight dtype, then .float()
        target_logit[s:e, None] = x.gather(1, tc)  # copy_ upcasts exactly
        if rows_kernel:  # the same arithmetic in two Triton row kernels, no fp32 [c, V] buffer (runtime/ce_rows.py)
            m, sums = ce_rows.row_stats(x, lse[s:e])
            if not compute_grad:
                continue
            g = ce_rows.row_grad_(x, tc, m, sums, coef[s:e])  # in place: g is x
        else:
            m = x.amax(1, keepdim=True)
            m = m.float().masked_fill_(m.isinf(), 0.0)  # as torch.logsumexp: an infinite max shifts by 0
            ex = x.sub_(m) if fp32_weight else torch.sub(x, m)  # fp32 either way
            ex.exp_()
            sums = ex.sum(1, keepdim=True)
            torch.add(sums.log(), m, out=lse[s:e, None])
            if not compute_grad:
                continue
            # (e / sum - onehot) * k  ==  (e - sum * onehot) * (k / sum); k = coef (0 for ignored tokens).
            ex.scatter_add_(1, tc, sums.mul(validf[s:e, None]).neg_())
            kc = coef[s:e, None].div(sums)
            g = ex.mul_(kc) if fp32_weight else torch.mul(ex, kc, out=x)  # HF's grad through .float() is cast back
            del ex
        torch.mm(g, weight, out=grad_h[s:e])
        if in_place:
            grad_w.addmm_(g.t(), hc)  # weight_dtype mode: the running sum rounds once per chunk
        else:
            grad_w.add_(torch.mm(g.t(), hc))  # one rounding per chunk to the weight dtype, fp32 accumulation
        del g, x
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    loss = loss_sum / n_valid.to(torch.float32) if reduction == "mean" else loss_sum
    if not compute_grad:
        return loss, h2.new_empty(0), weight.new_empty(0)
    return loss, grad_h.view_as(hidden), grad_w.to(weight.dtype)


@torch.library.custom_op("unsloth_fx::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunks: int = 4,
    chunk_size: int = 0,
    reduction: str = "mean",
    compute_grad: bool = True,
    grad_weight_accum: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, labels, ignore_index, chunks, chunk_size, reduction, compute_grad,
                         grad_weight_accum)


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, ignore_index=-100, chunks=4, chunk_size=0, reduction="mean", compute_grad=True,
      grad_weight_accum="fp32"):
    _check(hidden, weight, labels, chunks, chunk_size, reduction, grad_weight_accum)
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, grad_h, grad_w = output
    ctx.compute_grad = inputs[7]
    ctx.scaled_in_place = False
    # grad_hidden / grad_weight outputs get no tangent in practice; without this autograd would
    # materialize zeros of their shape (one more vocab x hidden tensor) before calling _backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_h, grad_w)


def _is_one_without_sync(g: torch.Tensor) -> bool:
    """Whether ``g`` is exactly 1 (``loss.backward()`` of the mean loss), checked only where reading
    it costs no device sync (a CPU tensor); elsewhere the multiply runs (in place, so memory is the
    same; only ~2 bytes x size of traffic)."""
    return g.device.type == "cpu" and g.numel() == 1 and bool(g.item() == 1.0)


def _backward(ctx: Any, grad_loss: torch.Tensor, _g1: Any, _g2: Any) -> tuple:
    """Scale the saved gradients by ``grad_loss``.

    Eager (real tensors, grad mode off: ordinary ``.backward()``): in place, so the saved
    ``grad_weight`` buffer becomes the returned gradient (AccumulateGrad then adopts it as ``.grad``)
    and no second vocab x hidden tensor is made; skipped when ``grad_loss`` is exactly 1 on CPU.
    After an in-place scale the saved values are gone: a second backward through the same graph
    (``retain_graph=True``) raises instead of returning doubly scaled gradients. Traced (fake /
    functional tensors under AOTAutograd): the functional op :func:`lce_grad_scale` (functionalization
    would turn an in-place op into an out-of-place one anyway); the backward-stage pass
    ``inplace_saved_grad_scale`` rewrites it to the in-place :func:`scale_`. ``create_graph=True``
    (grad mode on): a plain out-of-place multiply, differentiable in ``grad_loss``.
    Values are identical on every path (``x * s`` in the tensor dtype, or ``x`` when ``s == 1``).
    """
    if not ctx.compute_grad:
        raise RuntimeError(
            "linear_cross_entropy was called with compute_grad=False, so it kept no gradients; "
            "call it with compute_grad=True to train"
        )
    if ctx.scaled_in_place:
        raise RuntimeError(
            "linear_cross_entropy: backward ran twice through the same graph (retain_graph=True) after the "
            "first backward scaled its saved gradients in place by a grad_output != 1; the unscaled "
            "gradients are gone. Run the forward again for each backward, or backward with a grad_output of 1"
        )
    grad_h, grad_w = ctx.saved_tensors
    eager = (type(grad_loss) is torch.Tensor and type(grad_w) is torch.Tensor and not torch.is_grad_enabled())
    if not eager:
        if torch.is_grad_enabled():  # create_graph=True: differentiable in grad_loss
            return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                    None, None, None, None, None, None, None)
        # traced: the same multiply as an op of its own, so the backward graph says which saved
        # tensor it scales (the inplace_saved_grad_scale pass makes it in place)
        scale = torch.ops.unsloth_fx.lce_grad_scale
        return (scale(grad_h, grad_loss.to(grad_h.dtype)), scale(grad_w, grad_loss.to(grad_w.dtype)),
                None, None, None, None, None, None, None)
    if not _is_one_without_sync(grad_loss):
        ctx.scaled_in_place = True
        grad_h.mul_(grad_loss.to(grad_h.dtype))
        grad_w.mul_(grad_loss.to(grad_w.dtype))
    return grad_h, grad_w, None, None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("unsloth_fx::lce_grad_scale", mutates_args=())
def lce_grad_scale(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``g * s`` (``s`` 0-d, same dtype): the traced backward's scale of a saved gradient of
    ``linear_cross_entropy``. Functional, so AOTAutograd keeps it as is; a backward graph where
    ``g`` is a saved tensor with no other reader gets it replaced by :func:`scale_` (in place) by
    the ``inplace_saved_grad_scale`` pass."""
    return g * s


@lce_grad_scale.register_fake
def _(g, s):
    return torch.empty_like(g)


def scale_(x: torch.Tensor, s: torch.Tensor) -> None:
    """``x *= s`` in place (``s`` 0-d): the same kernel and rounding as ``x * s``."""
    x.mul_(s)


# A mutating op returning nothing, registered like unsloth_fx.fusion's fused_adamw_step_ (low-level
# Library API, one CompositeExplicitAutograd kernel): Inductor runs it as an extern kernel (the real
# ``mul_``, which bumps x's version counter), and the verifier lets unsloth_fx ops mutate.
_LIB = torch.library.Library("unsloth_fx", "FRAGMENT")
_LIB.define("scale_(Tensor(a!) x, Tensor s) -> ()")
_LIB.impl("scale_", scale_, "CompositeExplicitAutograd")


@torch.library.register_fake("unsloth_fx::scale_", lib=_LIB)
def _(x, s):
    return None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunks: int = 4,
    chunk_size: int = 0,
    reduction: str = "mean",
    grad_weight_accum: str = "fp32",
) -> torch.Tensor:
    """The loss only (fp32 scalar); differentiable in ``hidden`` and ``weight``.

    ``labels`` are already shifted: row ``i`` of ``hidden`` predicts ``labels[i]``.
    ``grad_weight_accum``: ``"fp32"`` or ``"weight_dtype"`` (see the module docstring).
    """
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return torch.ops.unsloth_fx.linear_cross_entropy(
        hidden, weight, labels, ignore_index, chunks, chunk_size, reduction, need, grad_weight_accum
    )[0]


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   chunks: int = 4, chunk_size: int = 0) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)`` without materializing the logits:
    ``labels`` are the *unshifted* ``[batch, seq]`` labels given to the model."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden, weight, shifted, ignore_index, chunks, chunk_size, "mean")


def patch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Make a transformers ``*ForCausalLM`` drop ``logits`` from its output when
    it is in training mode and was given ``labels`` (Liger's ``skip_logits``).

    Why: HF returns the full ``[batch, seq, vocab]`` logits next to the loss;
    as a graph output they must be materialized (and get a backward tangent),
    so no rewrite of the loss can avoid them. Once the output drops them,
    Dynamo no longer returns them and the ``fuse_linear_cross_entropy`` pass
    can replace ``lm_head`` + loss with the chunked op. The returned
    ``ModelOutput`` has ``logits=None`` in that case; eval mode, calls without
    labels and ``return_dict=False`` tuples are untouched. Idempotent; returns
    ``model`` (patched in place).
    """
    if getattr(model, "_ufx_skip_logits", False):
        return model
    orig = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if model.training and kwargs.get("labels") is not None and isinstance(out, dict) and "logits" in out:
            out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
        return out

    model.forward = forward
    model._ufx_skip_logits = True
    return model
