"""Fused LM head + cross-entropy that never holds the full ``[tokens, vocab]`` logits.

``torch.ops.unsloth_fx.linear_cross_entropy(hidden, weight, labels, ignore_index,
chunks, chunk_size, reduction, compute_grad) -> (loss, grad_hidden, grad_weight)``

computes ``cross_entropy((hidden @ weight.T).float(), labels)`` the way
transformers' ``ForCausalLMLoss`` does (logits in the weight's dtype, then
upcast to fp32; ``ignore_index`` tokens contribute nothing; ``mean`` divides by
the number of non-ignored tokens) one chunk of tokens at a time. Only one
chunk's logits (``chunk_tokens x vocab``, fp32 plus one copy in the input dtype)
exist at any moment.

Gradients are computed in the forward, chunk by chunk, and returned as extra
outputs that autograd saves; backward only scales them by the incoming
gradient. Why this and not "save the inputs, recompute in backward":

- FLOPs: computing the gradients in the forward costs the same three matmuls
  as unchunked training (logits, grad_hidden, grad_weight). Recomputing in
  backward adds a fourth (the logits again): +33% on the LM head, about +5%
  of a training step for R1-Distill-Qwen-1.5B (vocab 151,936 x hidden 1,536),
  which alone would eat the whole throughput allowance.
- Memory: what is kept from forward to backward is ``grad_hidden`` (the size of
  ``hidden``) and ``grad_weight`` (the size of the LM-head weight). Unchunked
  training creates that same ``grad_weight`` at the start of backward, when
  every activation is still alive, so the peak does not grow; ``grad_hidden``
  replaces the ``hidden`` activation the linear would have saved. Inside the
  op, ``grad_weight`` is accumulated in fp32 (one extra ``vocab x hidden`` fp32
  buffer while the op runs) so bf16 results round once, like one unchunked
  matmul, not once per chunk.

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

_REDUCTIONS = ("mean", "sum")


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunks: int, chunk_size: int,
           reduction: str) -> None:
    """Shape / argument checks shared by the real and fake kernels (errors name the fix)."""
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(hidden, weight, labels, chunks, chunk_size, reduction)
    H = weight.shape[1]
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1).to(torch.int64)
    T, V = h2.shape[0], weight.shape[0]
    valid = y != ignore_index
    if T:
        in_range = ~valid | ((y >= 0) & (y < V))
        torch._assert_async(in_range.all(), "linear_cross_entropy: a label is outside [0, vocab) and not ignore_index")
    n_valid = valid.sum()
    # Gradient scale: 1/n for mean; max(n, 1) keeps all-ignored batches at zero gradient instead of 0/0.
    scale = (1.0 / n_valid.clamp(min=1).to(torch.float32)) if reduction == "mean" else torch.ones((), device=h2.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h2.device)
    fp32_weight = weight.dtype == torch.float32
    if compute_grad:
        grad_h = torch.empty_like(h2)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    step = chunk_tokens(T, chunks, chunk_size)
    for s in range(0, T, step):
        hc, yc, vc = h2[s:s + step], y[s:s + step], valid[s:s + step]
        logits = (hc @ weight.t()).float()  # HF: lm_head in the weight dtype, then .float()
        lse = torch.logsumexp(logits, dim=-1)
        tgt = torch.where(vc, yc, 0)
        target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
        loss_sum = loss_sum + torch.where(vc, lse - target_logit, 0.0).sum()
        if not compute_grad:
            continue
        # d loss / d logits = (softmax - onehot) * valid * scale, built in place in the chunk's buffer.
        probs = logits.sub_(lse[:, None]).exp_()
        probs.scatter_add_(1, tgt[:, None], -vc.to(probs.dtype)[:, None])
        probs.mul_((vc.to(probs.dtype) * scale)[:, None])
        g = probs if fp32_weight else probs.to(weight.dtype)  # HF's grad through .float() is cast back
        del logits, probs
        grad_h[s:s + step] = g @ weight
        if fp32_weight:
            grad_w.addmm_(g.t(), hc)
        else:
            grad_w.add_(g.t() @ hc)  # one rounding per chunk to the weight dtype, fp32 accumulation
    loss = loss_sum / n_valid.to(torch.float32) if reduction == "mean" else loss_sum
    if not compute_grad:
        return loss, h2.new_empty(0), weight.new_empty(0)
    return loss, grad_h.view_as(hidden), grad_w.to(weight.dtype)


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, ignore_index=-100, chunks=4, chunk_size=0, reduction="mean", compute_grad=True):
    _check(hidden, weight, labels, chunks, chunk_size, reduction)
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, grad_h, grad_w = output
    ctx.compute_grad = inputs[7]
    ctx.save_for_backward(grad_h, grad_w)


def _backward(ctx: Any, grad_loss: torch.Tensor, _g1: Any, _g2: Any) -> tuple:
    if not ctx.compute_grad:
        raise RuntimeError(
            "linear_cross_entropy was called with compute_grad=False, so it kept no gradients; "
            "call it with compute_grad=True to train"
        )
    grad_h, grad_w = ctx.saved_tensors
    return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
            None, None, None, None, None, None)


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunks: int = 4,
    chunk_size: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss only (fp32 scalar); differentiable in ``hidden`` and ``weight``.

    ``labels`` are already shifted: row ``i`` of ``hidden`` predicts ``labels[i]``.
    """
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return torch.ops.unsloth_fx.linear_cross_entropy(
        hidden, weight, labels, ignore_index, chunks, chunk_size, reduction, need
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
