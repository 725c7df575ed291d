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
- rewrites each cross-chunk sum of per-chunk gradient partials (a weight used
  by every chunk gets one gradient contribution per chunk) into a running sum
  that consumes each partial as soon as it exists (:func:`accumulate_partials`),
- reports regions, chunks, tagged nodes and accumulated sums.

Why the running sum needs a rewrite. Autograd already traces the sum in chunk
order (``add(add(p3, p2), p1) ...``), so the eager-lowered backward is fine. But
the adds are pointwise and each has one user, so Inductor inlines the whole
chain into the one kernel that writes the final gradient (it realizes an
expression only past ``realize_acc_reads_threshold`` = 8 reads): every chunk's
partial stays alive until the end of the region's backward (22 x 129.5 MiB for
r1-distill-qwen-7b at 8 chunks, predicted). After the rewrite each step of the
sum is an extern kernel Inductor cannot inline: ``addmm(acc, A_k, B_k)`` when
the partials are ``mm`` products (dense and shared-expert MLPs, the router),
which also skips the separate partial altogether, else
``torch.ops.unsloth_fx.chunk_grad_add(acc, p_k)`` (MoE expert weights: a partial
from ``grouped_mm`` backward). At most the previous and the new accumulator of
one weight are alive (:func:`partial_grads_alive`).

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
from unsloth_fx.pass_base import PassContext, PassResult, UfxMeta, graph_pass, ufx

_aten = torch.ops.aten


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


@graph_pass(name="chunk_recompute", stage="joint", options={"chunks": "4", "accumulate": True})
def chunk_recompute(gm: torch.fx.GraphModule, ctx: PassContext, chunks: Any, accumulate: bool = True) -> PassResult:
    """Tag chunk-region forward intermediates MUST_RECOMPUTE, record region/chunk in UfxMeta and (with
    ``accumulate``, the default) turn cross-chunk gradient sums into running sums (:func:`accumulate_partials`).

    ``chunks`` is not used here (the split happens in pre_grad, from the same
    plan); it is accepted so one pipeline string configures both. Stats:
    ``regions``, ``chunks_per_region``, ``tagged`` (nodes newly tagged),
    ``accumulated`` (``{"addmm": sums, "chunk_grad_add": sums}`` rewritten; absent when none).
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
    stats: dict[str, Any] = {"regions": len(regions),
                             "chunks_per_region": {r: len(c) for r, c in sorted(regions.items())}, "tagged": tagged}
    acc = accumulate_partials(gm) if accumulate and regions else {}
    if acc:
        stats["accumulated"] = acc
    return PassResult(gm, tagged > 0 or bool(acc), stats)


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


# ---------------------------------------------------------------- running-sum accumulation

@torch.library.custom_op("unsloth_fx::chunk_grad_add", mutates_args=())
def chunk_grad_add(acc: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """``acc + partial``, as an op Inductor lowers as an extern call: its inputs are realized and its
    output is a buffer of its own, so a chain of them cannot be inlined into one kernel at the end
    (which would keep every partial alive). Same shape and dtype, no broadcasting. The result is
    contiguous whatever the inputs' layout, as the fake kernel says (``acc + partial`` would follow
    transposed inputs' strides: the MoE expert weights' grouped_mm partials on CUDA, where Inductor's
    stride check then failed on deepseek-v3-mini)."""
    out = torch.empty_like(acc, memory_format=torch.contiguous_format)
    return torch.add(acc, partial, out=out)


@chunk_grad_add.register_fake
def _(acc, partial):
    return torch.empty_like(acc, memory_format=torch.contiguous_format)


# Shape-only ops between a partial product and the sum (``t(t(mm))`` eager, ``permute(mm)`` decomposed).
_VIEW_OPS = frozenset({_aten.t.default, _aten.permute.default, _aten.transpose.int, _aten.view.default,
                       _aten._unsafe_view.default, _aten.reshape.default, _aten.alias.default})


def _is_add(n: Any) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is _aten.add.Tensor
            and len(n.args) == 2 and not n.kwargs)


def _val_of(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _chunk_of(n: torch.fx.Node) -> tuple[str | None, int | None]:
    rec = n.meta.get("ufx")
    if rec is not None and rec.chunk is not None:
        return rec.region, rec.chunk
    return region_of(n)


def _peel(leaf: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """(base, view chain from base up to ``leaf``) through single-user shape-only ops."""
    chain, b = [], leaf
    while b.op == "call_function" and b.target in _VIEW_OPS and len(b.users) == 1 and isinstance(b.args[0], torch.fx.Node):
        chain.append(b)
        b = b.args[0]
    return b, chain[::-1]


def _sum_trees(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, list[torch.fx.Node], list[torch.fx.Node]]]:
    """(root, its adds, its leaves) for every maximal tree of ``aten.add.Tensor`` whose inner adds each
    feed only the next add."""
    trees = []
    for n in gm.graph.nodes:
        if not _is_add(n) or (len(n.users) == 1 and _is_add(next(iter(n.users)))):
            continue
        adds, leaves, stack = [], [], [n]
        while stack:
            a = stack.pop()
            adds.append(a)
            for x in a.args:
                (stack if _is_add(x) and len(x.users) == 1 else leaves).append(x)
        trees.append((n, adds, leaves))
    return trees


def _fake_call(target: Any, args: tuple, kwargs: dict, like: list[torch.fx.Node]) -> Any:
    vals = [_val_of(a) for a in like]
    mode = _compat.detect_fake_mode(vals)
    conv = lambda a: _val_of(a) if isinstance(a, torch.fx.Node) else a  # noqa: E731
    a2, k2 = torch.fx.node.map_aggregate(args, conv), torch.fx.node.map_aggregate(kwargs, conv)
    if mode is None:
        return target(*a2, **k2)
    with mode:
        return target(*a2, **k2)


def _new_node(g: torch.fx.Graph, after: torch.fx.Node, target: Any, args: tuple, kwargs: dict,
              meta_from: torch.fx.Node, note: str | None = None) -> torch.fx.Node:
    with g.inserting_after(after):
        c = g.call_function(target, args, kwargs)
    c.meta = {k: v for k, v in meta_from.meta.items() if k not in ("val", "ufx", "tensor_meta")}
    c.meta["val"] = _fake_call(target, args, kwargs, [a for a in args if isinstance(a, torch.fx.Node)])
    old = meta_from.meta.get("ufx")
    if old is not None or note is not None:
        rec = ufx(c)
        if old is not None:
            rec.region, rec.chunk, rec.decision = old.region, old.chunk, old.decision
            rec.notes.update(old.notes)
        if note is not None:
            rec.notes["accumulates"] = note
    return c


def accumulate_partials(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rewrite every sum of per-chunk partials into a running sum in graph order. Returns how many
    sums were rewritten per kind (``{}`` when none: a second run is a no-op).

    A sum qualifies when it is a tree of ``aten.add.Tensor`` (no broadcasting: every leaf has the
    root's shape and dtype) whose leaves come from at least two chunks of one region (``UfxMeta``
    chunk, through shape-only ops). When every leaf is ``views(mm(A_k, B_k))`` with the same views,
    the sum becomes ``views(addmm(...addmm(mm(A_0, B_0), A_1, B_1)..., A_n, B_n))``, each ``addmm``
    where its ``mm`` was; otherwise ``chunk_grad_add(acc, p_k)`` right after each partial ``p_k``.
    Floating-point: the same additions in the same order as autograd's trace (each rounded to the
    dtype); ``addmm`` rounds the product and the sum once instead of twice.
    """
    g = gm.graph
    done = {"addmm": 0, "chunk_grad_add": 0}
    for root, adds, leaves in _sum_trees(gm):
        rv = _val_of(root)
        if not isinstance(rv, torch.Tensor) or len(set(leaves)) != len(leaves) or len(leaves) < 2:
            continue
        if not all(isinstance(x, torch.fx.Node) and isinstance(_val_of(x), torch.Tensor)
                   and tuple(_val_of(x).shape) == tuple(rv.shape) and _val_of(x).dtype == rv.dtype for x in leaves):
            continue
        peeled = [_peel(x) for x in leaves]
        tags = {_chunk_of(b) for b, _ in peeled}
        if None in {r for r, _ in tags} or len({r for r, _ in tags}) != 1 or len({k for _, k in tags}) < 2:
            continue
        order = {n: i for i, n in enumerate(g.nodes)}
        sig = {tuple((v.target, tuple(v.args[1:]), tuple(sorted(v.kwargs.items()))) for v in chain)
               for _, chain in peeled}
        if len(sig) == 1 and all(b.target is _aten.mm.default and len(b.users) == 1 for b, _ in peeled):
            items = sorted(peeled, key=lambda bc: order[bc[0]])
            acc = items[0][0]
            for b, _ in items[1:]:
                acc = _new_node(g, b, _aten.addmm.default, (acc, b.args[0], b.args[1]), {}, b, "addmm")
            out = acc
            for v in items[0][1]:
                out = _new_node(g, out, v.target, (out, *v.args[1:]), dict(v.kwargs), v)
            dead = [*adds, *(v for _, chain in items for v in chain), *(b for b, _ in items[1:])]
            done["addmm"] += 1
        else:
            items = sorted(leaves, key=order.__getitem__)
            out = items[0]
            for p in items[1:]:
                out = _new_node(g, p, torch.ops.unsloth_fx.chunk_grad_add.default, (out, p), {}, p, "chunk_grad_add")
            dead = list(adds)
            done["chunk_grad_add"] += 1
        root.replace_all_uses_with(out)
        for n in sorted(dead, key=order.__getitem__, reverse=True):
            g.erase_node(n)
    if not any(done.values()):
        return {}
    g.lint()
    gm.recompile()
    return {k: v for k, v in done.items() if v}


def partial_grads_alive(gm: torch.fx.GraphModule, lower: str = "eager") -> dict[str, int]:
    """On a backward graph: for each output that sums per-chunk partials, the most of its partials alive
    at once (``{output node name: count}``; only outputs with at least one partial).

    The partials of output ``o`` are the chunk nodes (``UfxMeta.chunk``) of its sum tree: walking up from
    ``o`` through shape-only ops, ``add``, ``addmm`` (its accumulator input) and ``chunk_grad_add``, every
    chunk node of ``o``'s dtype and element count met (a per-chunk contribution, or a running sum of them).
    A partial is alive from its node to the last node that reads its storage (views included), the
    reading node included. ``lower="inductor"`` models Inductor's inlining
    (``memory.model.inductor_inlined``, as the planner does): a pointwise chain is computed in the kernel
    of its first materialized consumer, so what it reads stays alive until there. Autograd's add chain
    under Inductor keeps every chunk's partial alive; an ``addmm`` running sum keeps 2 (the previous and
    the new accumulator); a ``chunk_grad_add`` one 3 while it runs (accumulator, partial, new accumulator).
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    outs = [a for a in nodes[-1].all_input_nodes if isinstance(_val_of(a), torch.Tensor)]

    def storage(n: torch.fx.Node) -> Any:
        if not isinstance(_val_of(n), torch.Tensor):
            return None
        s = _compat.node_storage(n)
        return s if s is not None else ("node", n.name)

    inl: dict[Any, frozenset] = {}
    if lower == "inductor":
        from unsloth_fx.memory.model import inductor_inlined

        pinned = {storage(a) for a in outs} | {storage(n) for n in nodes if n.op == "placeholder"}
        inl = inductor_inlined(nodes, storage, pinned - {None})
    last: dict[Any, int] = {}
    for n in nodes:
        for a in (*n.all_input_nodes, n):
            s = storage(a)
            for x in (inl.get(s, (s,)) if s is not None else ()):
                last[x] = order[n]
    res: dict[str, int] = {}
    for o in outs:
        ov = _val_of(o)
        parts, stack, seen = [], [o], set()
        while stack:
            n = stack.pop()
            v = _val_of(n)
            if (n in seen or n.op != "call_function" or not isinstance(v, torch.Tensor)
                    or v.numel() != ov.numel() or v.dtype != ov.dtype):
                continue
            seen.add(n)
            if n.target in _VIEW_OPS or _is_add(n):
                stack += [a for a in n.args if isinstance(a, torch.fx.Node)]
                continue
            if _chunk_of(n)[1] is None:
                continue
            parts.append(n)
            if n.target is _aten.addmm.default:
                stack.append(n.args[0])
            elif n.target is torch.ops.unsloth_fx.chunk_grad_add.default:
                stack += list(n.args)
        spans = [(order[n], last.get(storage(n), order[n])) for n in parts]
        if spans:
            res[o.name] = max(sum(a <= t <= b for a, b in spans) for t, _ in spans)
    return res
