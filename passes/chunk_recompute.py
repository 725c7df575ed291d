"""Pass `chunk_recompute` (joint stage): materialize chunked recompute regions.

Token-wise regions are split into per-chunk copies in the Dynamo graph by the
pre_grad pass ``split_token_chunks`` (gated MLPs) and, for the LM head +
cross-entropy, replaced by the chunked runtime op by
``fuse_linear_cross_entropy``. AOTAutograd copies the ``meta["custom"]``
region / chunk ids and the ``meta["recompute"]`` tags onto the aten nodes of the
joint graph. This pass, on the joint graph:

- records each region node in ``UfxMeta`` (``region``, ``chunk``; forward
  intermediates get ``decision="chunk"``),
- makes every forward intermediate of a chunk ``MUST_RECOMPUTE`` (the chunk's
  output, which flows on through ``cat``, is left to the partitioner), so the
  forward keeps only each region's inputs,
- reports regions, chunks and tagged nodes.

The min-cut partitioner then recomputes each chunk in the backward; its
autograd-order reordering places chunk k's recompute right before chunk k's
backward. :func:`chunk_order_violations` checks, on the backward graph, that
chunk k's recomputed activations die before chunk k+1's are created.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx


AUTO_FRACTION = 0.125
"""``chunks="auto"``: one chunk's recomputed working set may use at most this share of the budget headroom.

The headroom (budget minus parameters, gradients and AdamW state) must also hold
every saved activation of the step and the other regions' transients; an
eighth leaves the rest to them. A constant, not an option, so plans are
reproducible from the budget alone."""


def parse_chunks(value: Any, who: str) -> int | str:
    """The ``chunks`` option: an int >= 1 (or its string form from a pipeline string) or ``"auto"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: chunks={value!r} must be an int >= 1 or 'auto'") from None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{who}: chunks={value!r} must be an int >= 1 or 'auto'")
    if n < 1:
        raise ValueError(f"{who}: chunks={n} must be >= 1")
    return n


def planned_chunks(ctx: PassContext, region: str, default: Any) -> Any:
    """Chunk count for ``region`` ("lm_head", "mlp", "moe", ...) from the memory plan, else ``default``.

    Reads ``ctx.shared["memory_plan"]`` when a planner left one: a mapping or
    object with ``chunks`` = ``{region: int}`` (a ``"default"`` key applies to
    every region) or a plain int. ``default`` may be ``"auto"``.
    """
    plan: Any = ctx.shared.get("memory_plan")
    if plan is None:
        return default
    spec = plan.get("chunks") if isinstance(plan, dict) else getattr(plan, "chunks", None)
    if isinstance(spec, int) and spec >= 1:
        return spec
    if isinstance(spec, dict):
        n = spec.get(region, spec.get("default"))
        if isinstance(n, int) and n >= 1:
            return n
    return default


def _device_total(ctx: PassContext) -> int | None:
    if ctx.device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(ctx.device).total_memory
    return None


def static_bytes(ctx: PassContext) -> int:
    """Bytes that stay allocated through the step, from ``ctx.params``: every parameter and buffer, plus
    one gradient per trainable parameter (its dtype) and AdamW's two fp32 moments (8 bytes per trainable
    element). Conservative for HybridAdamW (compact moments) and fused optimizers (fewer live grads)."""
    total = 0
    for p in ctx.params.values():
        numel = math.prod(p.shape)
        nbytes = numel * torch.empty((), dtype=p.dtype, device="meta").element_size()
        total += nbytes
        if p.requires_grad and not p.is_buffer:
            total += nbytes + 8 * numel
    return total


def auto_chunks(units: int, bytes_per_unit: float, limit: float) -> int:
    """Smallest k in [1, units] with ``ceil(units / k) * bytes_per_unit <= limit``; ``units`` when none fits.

    ``units`` is the length of the split dimension (tokens, or the sequence for [batch, seq, ...]
    regions), ``bytes_per_unit`` the region's working set per unit of it, ``limit`` in bytes."""
    units = max(1, int(units))
    if bytes_per_unit <= 0:
        return 1
    per_chunk = math.floor(limit / bytes_per_unit) if limit > 0 else 0  # units one chunk may hold
    if per_chunk < 1:
        return units
    return min(units, math.ceil(units / per_chunk))


def resolve_chunks(ctx: PassContext, region: str, option: Any, units: int, bytes_per_unit: float,
                   who: str) -> tuple[int, dict[str, Any]]:
    """(chunk count, how it was chosen) for one region.

    Order: the memory plan's count for ``region`` if a planner left one; else the ``chunks`` option when
    it is an int; else (``"auto"``) :func:`auto_chunks` with ``limit = AUTO_FRACTION * (budget -
    static_bytes(ctx))``. ``"auto"`` without a ``memory_budget`` is an error naming the fix.
    """
    planned = planned_chunks(ctx, region, None)
    if planned is not None:
        return int(planned), {"source": "plan"}
    if option != "auto":
        return int(option), {"source": "option"}
    budget = ctx.options.resolve_budget(_device_total(ctx))
    if budget is None:
        raise ValueError(f"{who}: chunks='auto' needs a memory_budget (e.g. options={{'memory_budget': '7GiB'}}); "
                         "or give an int, e.g. chunks=8")
    static = static_bytes(ctx)
    headroom = budget - static
    limit = AUTO_FRACTION * headroom
    k = auto_chunks(units, bytes_per_unit, limit)
    info = {"source": "auto", "budget": budget, "static_bytes": static, "headroom": headroom,
            "limit": int(limit), "units": int(units), "bytes_per_unit": int(math.ceil(bytes_per_unit)),
            "chunk_bytes": int(math.ceil(math.ceil(max(1, units) / k) * bytes_per_unit))}
    if headroom <= 0 or info["chunk_bytes"] > limit:
        info["note"] = (f"even {math.ceil(max(1, units) / k)} unit(s) per chunk exceed the limit "
                        f"{int(limit)} B; using the maximum chunk count")
    return k, info


def region_of(node: torch.fx.Node) -> tuple[str | None, int | None]:
    """(region id, chunk index) a node was traced from, or (None, None)."""
    custom = node.meta.get("custom") or {}
    return custom.get("ufx_region"), custom.get("ufx_chunk")


def _tangent_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    dep: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


@graph_pass(name="chunk_recompute", stage="joint", options={"chunks": "4"})
def chunk_recompute(gm: torch.fx.GraphModule, ctx: PassContext, chunks: Any) -> PassResult:
    """Tag chunk-region forward intermediates MUST_RECOMPUTE and record region/chunk in UfxMeta.

    ``chunks`` is not used here (the split happens in pre_grad, from the same
    plan); it is accepted so one pipeline string configures both. Stats:
    ``regions``, ``chunks_per_region``, ``tagged`` (nodes newly tagged).
    """
    parse_chunks(chunks, "chunk_recompute")
    must = _compat.checkpoint_policy().MUST_RECOMPUTE
    backward = _tangent_dependent(gm)
    regions: dict[str, set[int]] = {}
    tagged = 0
    for n in gm.graph.nodes:
        rid, k = region_of(n)
        if rid is None or k is None or n.op != "call_function":
            continue
        regions.setdefault(rid, set()).add(k)
        rec = ufx(n)
        if (rec.region, rec.chunk) != (rid, k):
            rec.region, rec.chunk = rid, k
        count = (n.meta.get("custom") or {}).get("ufx_chunks")
        if count is not None:
            rec.notes["chunks"] = count
        if n in backward:
            continue
        # The chunk's last forward node feeds the cat; it is an output, not a saved activation.
        if any(region_of(u)[0] == rid and region_of(u)[1] is None for u in n.users):
            continue
        if rec.decision != "chunk":
            rec.decision = "chunk"
        if n.meta.get("recompute") != must:
            n.meta["recompute"] = must
            tagged += 1
    stats = {"regions": len(regions), "chunks_per_region": {r: len(c) for r, c in sorted(regions.items())},
             "tagged": tagged}
    return PassResult(gm, tagged > 0, stats)


def chunk_order_violations(gm: torch.fx.GraphModule) -> list[str]:
    """On a backward graph: for each region, chunks' recomputed activations must not overlap.

    A recomputed activation is a node of the region whose chunk's forward was
    recomputed (``UfxMeta.decision == "chunk"``). Chunk order is the order in
    which the chunks' first activations appear. Returns one message per pair of
    consecutive chunks where chunk k's activations are still used after chunk
    k+1's first one is made; [] when the order holds.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # Views of weights (``t(primals_k)``) carry a chunk id too but hold no activation, and CSE shares
    # them between chunks: they are left out. So are nodes without inputs (a MoE chunk's
    # ``arange(tokens * top_k)``): the partitioner hoists such constants to the top of the backward;
    # they hold a few integers per token, not an activation.
    weight_only: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        ins = n.all_input_nodes
        if n.op == "call_function" and ins and all(
                (a.op == "placeholder" and a.name.startswith("primals")) or a in weight_only for a in ins):
            weight_only.add(n)
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
    spans: dict[str, dict[int, list[int]]] = {}
    for n in gm.graph.nodes:
        rec = n.meta.get("ufx")
        if (rec is None or rec.decision != "chunk" or rec.chunk is None or n.op != "call_function"
                or n in weight_only or not n.all_input_nodes):
            continue
        span = spans.setdefault(rec.region, {}).setdefault(rec.chunk, [order[n], last_use[n]])
        span[0], span[1] = min(span[0], order[n]), max(span[1], last_use[n])
    out = []
    for rid, per in sorted(spans.items()):
        seq = sorted(per.items(), key=lambda kv: kv[1][0])
        for (ka, (_, end_a)), (kb, (start_b, _)) in zip(seq, seq[1:]):
            if end_a >= start_b:
                out.append(f"{rid}: chunk {ka} is still used at node #{end_a} after chunk {kb} starts at #{start_b}")
    return out
