"""Pass `fuse_linear_cross_entropy` (pre_grad): LM head + cross-entropy -> one chunked runtime op.

Pattern, in the Dynamo graph of a transformers ``*ForCausalLM`` (``ForCausalLMLoss``)::

    logits = linear(hidden, weight)            # bias None, logits used only by the chain below
    x = logits.float() | .to(torch.float32)    # optional upcast(s)
    x = x.view(-1, V) | .reshape(-1, V)        # optional flatten(s) / .contiguous()
    loss = cross_entropy(x, target, ignore_index=i, reduction="mean"|"sum")   # no weight, no smoothing
  ->
    out = torch.ops.unsloth_fx.linear_cross_entropy(hidden, weight, target, i, chunks, chunk_size, reduction, grad,
                                                    grad_weight_accum)
    loss = out[0]

The label shift (pad + slice) stays in the graph: it is cheap and the op takes
already-shifted labels. If the logits have any other user (HF returns them as
an output), the match is skipped and the stats say why: fusing then would
compute the logits twice and save nothing. ``unsloth_fx.runtime.
linear_cross_entropy.patch_causal_lm(model)`` removes that output in training.

Chunk count: ``ctx.shared["memory_plan"]`` when a planner left one with a
chunk count for ``lm_head`` (see ``chunk_recompute.planned_chunks``), else the
``chunks`` option: an int, or ``"auto"`` (from the logits bytes and the
``memory_budget``, see ``chunk_recompute.resolve_chunks``); ``chunk_size > 0``
fixes the tokens per chunk instead.

``grad_weight_accum`` (default ``"weight_dtype"``): where the op sums the LM-head gradient over
chunks. The pass only runs to save memory, so its default is the op's memory-saving mode: summed
in the weight dtype with ``addmm_`` (no ``vocab x hidden`` fp32 buffer: -890 MiB for
R1-Distill-Qwen-1.5B, -2.03 GiB for the 7B, at the end of the forward; one bf16 rounding of the
running sum per chunk, measured error in runtime/linear_cross_entropy.py). ``"fp32"`` keeps the
fp32 accumulator: ``fuse_linear_cross_entropy{chunks=8,grad_weight_accum=fp32}``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from unsloth_fx import _compat
import torch.fx

import unsloth_fx.runtime.linear_cross_entropy  # noqa: F401  (registers torch.ops.unsloth_fx.linear_cross_entropy)
from unsloth_fx.runtime.linear_cross_entropy import GRAD_WEIGHT_ACCUM
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx
from unsloth_fx.passes.chunk_recompute import parse_chunks, resolve_chunks

_LINEAR = _compat.LINEAR_TARGETS
_CE = {torch.nn.functional.cross_entropy}
_FLATTEN_METHODS = {"view", "reshape", "contiguous", "flatten"}


def _val(node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _is_upcast(n: torch.fx.Node) -> bool:
    if n.op != "call_method":
        return False
    if n.target == "float" and len(n.args) == 1 and not n.kwargs:
        return True
    if n.target == "to":
        rest = list(n.args[1:]) + list(n.kwargs.values())
        return rest == [torch.float32]
    return False


def _kw(node: torch.fx.Node, name: str, pos: int, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _match(ce: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | str:
    """The linear node and the chain between it and ``ce``, or why there is no match."""
    # cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    if _kw(ce, "weight", 2, None) is not None or _kw(ce, "label_smoothing", 7, 0.0) != 0.0:
        return "class weights / label smoothing"
    if _kw(ce, "size_average", 3, None) is not None or _kw(ce, "reduce", 5, None) is not None:
        return "legacy size_average/reduce"
    if _kw(ce, "reduction", 6, "mean") not in ("mean", "sum"):
        return f"reduction={_kw(ce, 'reduction', 6, 'mean')!r}"
    chain: list[torch.fx.Node] = []
    x = ce.args[0]
    while isinstance(x, torch.fx.Node) and x.op == "call_method" and (x.target in _FLATTEN_METHODS or _is_upcast(x)):
        chain.append(x)
        x = x.args[0]
    if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in _LINEAR):
        return "cross_entropy input is not a linear (+ upcast / flatten)"
    bias = _kw(x, "bias", 2, None)
    if bias is not None:
        return "lm_head has a bias"
    for n in [x, *chain]:
        if len(n.users) != 1:
            return f"logits ({n.name}) have other users (a graph output?); use patch_causal_lm(model)"
    w = _val(x.args[1])
    if isinstance(w, torch.Tensor) and w.dim() != 2:
        return "weight is not 2-D"
    return x, chain


def logit_bytes(dtype: torch.dtype) -> int:
    """Bytes one logit takes inside the op: the fp32 copy, plus the weight-dtype product when that is not
    fp32 (``(h @ W.T).float()``)."""
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    return 4 + (0 if dtype == torch.float32 else size)


@graph_pass(name="fuse_linear_cross_entropy", stage="pre_grad",
            options={"chunks": "4", "chunk_size": 0, "grad_weight_accum": "weight_dtype"})
def fuse_linear_cross_entropy(gm: torch.fx.GraphModule, ctx: PassContext, chunks: Any, chunk_size: int,
                              grad_weight_accum: str = "weight_dtype") -> PassResult:
    """Replace ``cross_entropy(linear(h, W).float().view(-1, V), y)`` with the chunked
    ``unsloth_fx.linear_cross_entropy`` op; stats: ``fused``, ``chunks`` (the last op's count),
    ``chunks_per_region``, ``auto`` (how "auto" chose, per region), ``skipped`` (reasons).

    ``chunks``: an int >= 1 or ``"auto"``: the smallest count whose chunk logits
    (``ceil(tokens / k) * vocab * logit_bytes(dtype)``) fit ``AUTO_FRACTION`` of the budget headroom
    (``chunk_recompute.resolve_chunks``). ``grad_weight_accum``: ``"weight_dtype"`` | ``"fp32"``
    (the op argument; see the module docstring)."""
    if chunk_size < 0:
        raise ValueError(f"fuse_linear_cross_entropy: chunk_size={chunk_size} must be >= 0")
    if grad_weight_accum not in GRAD_WEIGHT_ACCUM:
        raise ValueError(f"fuse_linear_cross_entropy: grad_weight_accum={grad_weight_accum!r} is not one of "
                         f"{GRAD_WEIGHT_ACCUM}")
    option = parse_chunks(chunks, "fuse_linear_cross_entropy")
    per_region: dict[str, int] = {}
    auto: dict[str, Any] = {}
    fused, skipped = 0, []
    g = gm.graph
    for ce in list(g.nodes):
        if ce.op != "call_function" or ce.target not in _CE:
            continue
        m = _match(ce)
        if isinstance(m, str):
            skipped.append(f"{ce.name}: {m}")
            continue
        lin, chain = m
        hidden, weight, target = lin.args[0], lin.args[1], ce.args[1]
        hv, wv = _val(hidden), _val(weight)
        grad = bool(getattr(hv, "requires_grad", True) or getattr(wv, "requires_grad", True))
        rid = f"lm_head_ce_{fused}"
        tokens, per_token = 1, 0
        if isinstance(hv, torch.Tensor) and isinstance(wv, torch.Tensor) and hv.dim() >= 1:
            tokens = _compat.symint_hint(hv.numel() // max(1, hv.shape[-1]))[0] or 1
            per_token = (_compat.symint_hint(wv.shape[0])[0] or 0) * logit_bytes(wv.dtype)
        chunks, info = resolve_chunks(ctx, "lm_head", option, tokens, per_token, "fuse_linear_cross_entropy")
        per_region[rid] = chunks
        if info["source"] == "auto":
            auto[rid] = info
        args = (hidden, weight, target, int(_kw(ce, "ignore_index", 4, -100)), chunks, chunk_size,
                str(_kw(ce, "reduction", 6, "mean")), grad, grad_weight_accum)
        with g.inserting_before(ce):
            op = g.call_function(torch.ops.unsloth_fx.linear_cross_entropy.default, args)
            loss = g.call_function(operator.getitem, (op, 0))
        _fake_values(op, loss, args)
        for n in (op, loss):
            n.meta["stack_trace"] = lin.meta.get("stack_trace")
            rec = ufx(n)
            rec.region, rec.decision = rid, "chunk"
            rec.notes.update(chunks=chunks, chunk_size=chunk_size, pattern="linear+cross_entropy",
                             grad_weight_accum=grad_weight_accum)
        ce.replace_all_uses_with(loss)
        g.erase_node(ce)
        for n in [*chain, lin]:  # chain runs from the cross_entropy side, so users go first
            if not n.users:
                g.erase_node(n)
        fused += 1
    if fused:
        g.lint()
        gm.recompile()
    stats = {"fused": fused, "chunks": per_region[f"lm_head_ce_{fused - 1}"] if fused else option,
             "chunk_size": chunk_size, "chunks_per_region": per_region, "skipped": skipped,
             "grad_weight_accum": grad_weight_accum}
    if auto:
        stats["auto"] = auto
    return PassResult(gm, fused > 0, stats)


def _fake_values(op: torch.fx.Node, loss: torch.fx.Node, args: tuple) -> None:
    """Give the new nodes fake values (for dumps and later pre_grad passes)."""
    vals = [_val(a) if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next((v.fake_mode for v in vals[:3] if hasattr(v, "fake_mode")), None)
    if mode is None or any(v is None for v in vals[:3]):
        return
    try:
        with mode:
            out = torch.ops.unsloth_fx.linear_cross_entropy.default(*vals)
    except Exception:  # fake propagation is best effort here; AOTAutograd re-traces anyway
        return
    op.meta["example_value"] = out
    loss.meta["example_value"] = out[0]
