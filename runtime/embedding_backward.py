"""Embedding backward without a vocabulary-sized fp32 buffer.

``torch.ops.unsloth_fx.embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
scale_grad_by_freq) -> grad_weight`` computes what ``aten.embedding_dense_backward`` and its
decomposition compute: ``grad_weight[v] = sum over tokens t with indices[t] == v of grad_output[t]``
(divided by the count of ``v`` when ``scale_grad_by_freq``), rows ``padding_idx`` and out-of-range
indices contributing nothing, summed in fp32 and rounded once to ``grad_output``'s dtype.

Why an op of our own. The backend traces with Inductor's decomposition table, which turns
``aten.embedding_dense_backward`` into ``zeros([V, H], fp32)`` + ``index_put(accumulate=True)`` +
a cast to bf16: a ``vocab x hidden`` fp32 buffer (890 MiB for R1-Distill-Qwen-1.5B, 2.03 GiB for
the 7B) next to the bf16 gradient, at the end of backward where it set the predicted peak.
Keeping the aten op instead (torch's CUDA kernel sums per unique token into fp32 partials sized by
tokens) does not work through Inductor: its lowering makes an implicit fallback only for ops
absent from its decomposition table, and asserts otherwise; and torch's CPU kernel accumulates in
the weight dtype (bf16 error ~10x one rounding at 8192 tokens over 50 rows). A custom op is lowered by Inductor as
an extern call on every torch version, runs the same code on CPU and CUDA, and is sized exactly by
the memory model (:func:`workspace_bytes`).

Algorithm (no device sync, fp32 work sized by tokens, not vocabulary): sort the ``T`` token ids,
number the runs of equal ids (segments), ``index_add_`` each token's fp32 gradient into a
``[T, H]`` fp32 buffer at its segment, zero the segment of invalid tokens, cast the ``[T, H]``
partial sums once to the output dtype and ``index_add_`` them into the zero-filled ``[V, H]``
output at each segment's id. Each output row receives one non-zero partial (segments are
distinct ids); unused segment slots carry zeros to row 0, and ``x + 0 == x`` exactly, so the result
is the fp32 sum rounded once (summation order inside a segment is ``index_add_``'s, as in the
decomposition's ``index_put``).
"""

from __future__ import annotations

import torch

_INDEX_BYTES_PER_TOKEN = 32  # [T] index buffers alive at once (measured 17 B/token on CPU: bool masks, int64 ids)


def workspace_bytes(tokens: int, hidden: int, dtype: torch.dtype, scale_grad_by_freq: bool = False) -> int:
    """Peak bytes the op allocates internally beyond its ``[V, H]`` output (an upper bound, bytes):
    the ``[T, H]`` fp32 partial sums plus one ``[T, H]`` fp32 copy of the incoming gradient (none
    when it is already fp32 and unscaled), plus ``_INDEX_BYTES_PER_TOKEN`` per token of index
    buffers. The cast of the partial sums to ``dtype`` happens after the fp32 copy is freed and is
    smaller than it."""
    fp32_copy = 0 if (dtype == torch.float32 and not scale_grad_by_freq) else 4
    return tokens * hidden * (4 + fp32_copy) + tokens * _INDEX_BYTES_PER_TOKEN


def _impl(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int,
          scale_grad_by_freq: bool) -> torch.Tensor:
    rest = tuple(grad_output.shape[indices.dim():])
    out = grad_output.new_zeros((num_weights, *rest))
    idx = indices.reshape(-1).to(torch.int64)
    T = idx.numel()
    if T == 0 or num_weights == 0:
        return out
    g = grad_output.reshape(T, -1)
    dev = idx.device
    in_range = (idx >= 0) & (idx < num_weights)
    # invalid tokens (out of range, padding) share one segment keyed past the vocabulary, zeroed below
    key = torch.where(in_range & (idx != padding_idx), idx, num_weights)
    sorted_key, order = key.sort()
    del key
    starts = torch.ones(T, dtype=torch.bool, device=dev)
    torch.ne(sorted_key[1:], sorted_key[:-1], out=starts[1:])
    seg_sorted = starts.cumsum(0).sub_(1)
    del starts
    seg = torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)  # segment of each token
    del order
    # segment -> its row; duplicate writes carry the same value; unused slots stay 0 (they add zeros)
    row = torch.zeros(T, dtype=torch.int64, device=dev).scatter_(0, seg_sorted, sorted_key)
    del seg_sorted, sorted_key
    src = g.to(torch.float32)
    if scale_grad_by_freq:
        # divide by how often the index occurs (the decomposition's count); padding and out-of-range
        # tokens share the invalid segment, whose sum is zeroed below, so their count does not matter
        counts = torch.zeros(T, dtype=torch.float32, device=dev).index_add_(
            0, seg, torch.ones(T, dtype=torch.float32, device=dev))
        divisor = counts.gather(0, seg).unsqueeze(1)
        src = src / divisor if src is g else src.div_(divisor)
        del counts, divisor
    partial = torch.zeros(T, g.shape[1], dtype=torch.float32, device=dev)
    partial.index_add_(0, seg, src)
    del src, seg
    # the invalid segment is the last one when present: its row reads num_weights
    partial.masked_fill_((row == num_weights).unsqueeze(1), 0.0)
    row.clamp_(max=num_weights - 1)
    out.view(num_weights, -1).index_add_(0, row, partial.to(out.dtype))
    return out


@torch.library.custom_op("unsloth_fx::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int,
                             padding_idx: int, scale_grad_by_freq: bool) -> torch.Tensor:
    return _impl(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq)


@embedding_dense_backward.register_fake
def _(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    return grad_output.new_empty((num_weights, *grad_output.shape[indices.dim():]))


def decompose_embedding_dense_backward(grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int,
                                       padding_idx: int, scale_grad_by_freq: bool) -> torch.Tensor:
    """Decomposition-table entry for ``aten.embedding_dense_backward``: our op."""
    return torch.ops.unsloth_fx.embedding_dense_backward.default(
        grad_output, indices, num_weights, padding_idx, scale_grad_by_freq)


def with_decomposition(table: dict | None) -> dict:
    """``table`` (a decomposition table, not modified) with ``aten.embedding_dense_backward`` mapped
    to this op wherever ``table`` would decompose it (Inductor's table does: the vocab-sized fp32
    ``index_put``). A table that keeps the aten op (``{}``, the eager lowering) is returned as is:
    torch's CUDA kernel already sums in fp32 partials sized by tokens."""
    table = dict(table or {})
    aten_op = torch.ops.aten.embedding_dense_backward.default
    if aten_op in table:
        table[aten_op] = decompose_embedding_dense_backward
    return table
