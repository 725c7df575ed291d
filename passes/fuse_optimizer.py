"""Pass `fuse_optimizer`: run each parameter's optimizer update inside backward.

Joint stage, after the memory passes. With ``fuse_optimizer=True`` and the
graph's parameters held by a ``HybridAdamW`` (bound with
``unsloth_fx.fusion.attach`` or found by a scan), for every trainable
parameter primal ``W`` with gradient ``dW`` the pass inserts::

    torch.ops.unsloth_fx.fused_adamw_step_(W, dW, "<fqn>", <slot>, [<after>...])

and replaces ``dW`` in the joint graph's outputs with ``None``: the backward
graph returns no gradient for ``W``, autograd accumulates nothing and
``W.grad`` stays ``None`` (AOTAutograd already returns ``None`` for inputs
without gradients, so the runtime wrapper and autograd accept it).

Placement. The update must come after ``dW`` is final and after the last
backward read of ``W``'s old value. The partitioner may recompute forward
values in backward (views such as ``t(W)``, pointwise ops, anything tagged
for recompute), and a recomputed value reads ``W`` where it is recomputed,
so the pass treats every forward node that depends on ``W`` (transitively)
as a read of ``W``: the update goes after the last backward node that
consumes any of them. The op mutates ``W`` (``mutates_args``), so the
partitioner keeps it in backward (impure nodes survive dead-code
elimination) and saves ``W`` for backward (free: it is a parameter).

Ordering for a lowering. The op's last argument, ``after``, lists the
backward values computed before the update that depend on ``W``'s old value
(transitively, through anything but a matmul, whose output is always a
materialized buffer) and are still used after it. The op ignores them; they
are data dependencies. Without them Inductor computes a wrong gradient: it
keeps a pointwise value such as ``dh * W`` (RMSNorm backward) unmaterialized,
registers the mutating op, and only then materializes the pending readers of
``W`` (``mark_buffer_mutated``), so the kernel that reads ``W`` runs after
the update (torch 2.13, ``ExternKernelAlloc.__init__`` registers the op before
``FallbackKernel`` creates its ``MutationOutput``). Inputs of an extern op are
materialized before it, which restores the order.

Deterministic (graph order; ties by primal index) and idempotent (a primal
whose gradient output is already ``None`` is left alone).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx

OP_NAME = "unsloth_fx.fused_adamw_step_"


GROUP_OP_NAME = "unsloth_fx.fused_adamw_steps_"
DEFAULT_GROUP_BYTES = 64 << 20  # a decoder layer's small tensors (norms, biases, k/v projections) share a call


def _op():
    import unsloth_fx.fusion  # noqa: F401  (registers torch.ops.unsloth_fx.fused_adamw_step_)

    return torch.ops.unsloth_fx.fused_adamw_step_.default


def _group_op():
    import unsloth_fx.fusion  # noqa: F401  (registers torch.ops.unsloth_fx.fused_adamw_steps_)

    return torch.ops.unsloth_fx.fused_adamw_steps_.default


def update_members(node: torch.fx.Node) -> list[tuple[torch.fx.Node, Any, str]]:
    """[(parameter node, gradient node, name)] a fused update node updates, in order; [] for
    any other node. Works for both the one-parameter and the grouped op."""
    if node.op != "call_function":
        return []
    if node.target is _op():
        return [(node.args[0], node.args[1], node.args[2])]
    if node.target is _group_op():
        return list(zip(node.args[0], node.args[1], node.args[2]))
    return []


def grad_nbytes(g: Any) -> int:
    """Bytes of a gradient node's value (its size hint when symbolic; 0 when unknown)."""
    val = g.meta.get("val") if isinstance(g, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return 0
    n, _ = _compat.symint_hint(val.numel())
    return int(n or 0) * val.element_size()


def plan_groups(updates: list[tuple[int, int, Any, int]], group_bytes: int) -> list[list[tuple[int, int, Any, int]]]:
    """Group ``updates`` = [(position, primal index, binding, gradient bytes)] in update order
    (position, then primal index): consecutive updates of one binding share a group until the
    next one would take its gradients past ``group_bytes`` (a single larger gradient is a group
    of its own). ``group_bytes <= 0``: one group per update. The memory model runs the same
    function (unsloth_fx.memory.model), so what it counts is what the pass emits."""
    groups: list[list] = []
    total = 0
    for u in sorted(updates, key=lambda u: (u[0], u[1])):
        if (groups and group_bytes > 0 and groups[-1][-1][2] is u[2]
                and total + u[3] <= group_bytes):
            groups[-1].append(u)
            total += u[3]
        else:
            groups.append([u])
            total = u[3]
    return groups


def _last_reads(graph: torch.fx.Graph, primals: list[torch.fx.Node]) -> tuple[dict[torch.fx.Node, int], dict[int, int]]:
    """(position of each node, {primal index: position of the last backward node that reads
    a forward value depending on that primal}). Backward = depends on a ``tangents_*`` input."""
    pos: dict[torch.fx.Node, int] = {}
    dep: dict[torch.fx.Node, int] = {}  # forward node -> bitmask of primals it depends on
    bw: set[torch.fx.Node] = set()
    bit = {n: i for i, n in enumerate(primals)}
    bw_reads: list[tuple[int, int]] = []  # (position, mask of primals read through forward values)
    for k, n in enumerate(graph.nodes):
        pos[n] = k
        if n.op == "placeholder":
            if n.name.startswith("tangents"):
                bw.add(n)
            elif n in bit:
                dep[n] = 1 << bit[n]
            continue
        if n.op == "output":
            break
        ins = n.all_input_nodes
        if any(a in bw for a in ins):
            bw.add(n)
            mask = 0
            for a in ins:
                mask |= dep.get(a, 0)
            if mask:
                bw_reads.append((k, mask))
        else:
            mask = 0
            for a in ins:
                mask |= dep.get(a, 0)
            if mask:
                dep[n] = mask
    last: dict[int, int] = {}
    remaining = (1 << len(primals)) - 1
    for k, mask in reversed(bw_reads):  # each primal is assigned once, by its last reader
        m = mask & remaining
        while m:
            low = m & -m
            last[low.bit_length() - 1] = k
            m ^= low
        remaining &= ~mask
        if not remaining:
            break
    return pos, last


# ops whose output is a materialized buffer under every lowering (Inductor: extern kernels), so a
# value computed from it holds no pending read of a parameter; dependence stops there
_MATERIALIZING = frozenset({"aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm"})


def _materializes(n: torch.fx.Node) -> bool:
    packet = getattr(n.target, "_overloadpacket", None)
    return packet is not None and str(packet) in _MATERIALIZING


def _pending_reads(graph: torch.fx.Graph, primals: list[torch.fx.Node]) -> tuple[dict[torch.fx.Node, int], set]:
    """({node: bitmask of primals whose old value it may still read lazily}, backward nodes).

    Transitive through every op except the materializing ones; an over-approximation (it can
    only add ordering arguments, never drop a needed one)."""
    bit = {n: i for i, n in enumerate(primals)}
    dep: dict[torch.fx.Node, int] = {}
    bw: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if n.name.startswith("tangents"):
                bw.add(n)
            elif n in bit:
                dep[n] = 1 << bit[n]
            continue
        if n.op == "output":
            break
        ins = n.all_input_nodes
        if any(a in bw for a in ins):
            bw.add(n)
        if _materializes(n):
            continue
        mask = 0
        for a in ins:
            mask |= dep.get(a, 0)
        if mask:
            dep[n] = mask
    return dep, bw


def _live_across(graph: torch.fx.Graph, pos: dict, dep: dict, bw: set, i: int, at: int) -> list[torch.fx.Node]:
    """Backward nodes at or before position ``at`` that may read primal ``i`` lazily and have a
    user after ``at``: what must be computed before an update of primal ``i`` placed after ``at``."""
    out = []
    for n, mask in dep.items():
        if n in bw and mask >> i & 1 and pos[n] <= at and any(pos[u] > at for u in n.users):
            out.append(n)
    return sorted(out, key=pos.__getitem__)


@graph_pass(name="fuse_optimizer", stage="joint", options={"group_bytes": DEFAULT_GROUP_BYTES})
def fuse_optimizer(gm: torch.fx.GraphModule, ctx: PassContext, group_bytes: int = DEFAULT_GROUP_BYTES) -> PassResult:
    """Insert the in-backward optimizer update for each trainable parameter and drop its gradient output.

    ``group_bytes``: consecutive updates (backward order) share one ``fused_adamw_steps_`` call
    while their gradients' bytes stay within it (see :func:`plan_groups`); 0: one
    ``fused_adamw_step_`` call per parameter."""
    if not ctx.options.fuse_optimizer:
        return PassResult(gm, False, {"status": "off (fuse_optimizer=False)"})
    from unsloth_fx import fusion

    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if n.name.startswith("primals")]
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = list(out.args[0])
    nfwd = ctx.num_fwd_outputs or 0
    grads = outs[nfwd:]
    if len(grads) != len(primals):
        raise RuntimeError(f"joint graph has {len(primals)} primals but {len(grads)} gradient outputs")

    op, gop = _op(), _group_op()
    already = {p for n in graph.nodes for p, _, _ in update_members(n)}
    candidates, skipped, wanted = [], {}, []
    for i, info in sorted(ctx.params.items()):
        if info.is_buffer or not info.requires_grad or i >= len(primals):
            continue
        if info.tensor is None:
            skipped[info.name] = "no real tensor (fake/meta tracing)"
            continue
        if primals[i] in already or grads[i] is None:
            continue
        wanted.append((i, info))
    for (i, info), b in zip(wanted, fusion.bindings_for([info.tensor for _, info in wanted])):
        if b is None:
            skipped[info.name] = "no HybridAdamW holds it"
            continue
        candidates.append((i, info, b))
    stats: dict = {"fused": 0, "kept_grads": len(skipped)}
    if skipped:
        stats["skipped"] = skipped
        warnings.warn(f"fuse_optimizer: {len(skipped)} parameter(s) keep their gradients: "
                      + ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:4]), stacklevel=2)
    if not candidates:
        return PassResult(gm, False, stats)

    pos, last = _last_reads(graph, primals)
    dep, bw = _pending_reads(graph, primals)
    # Drop the fused gradients from the outputs first: otherwise the output node is a "later user" of every one
    # of them, and _live_across lists a gradient in the `after` arguments of every later update that its value
    # lazily depends on (the embedding's, last in backward, for the LM-head and norm gradients), which keeps it
    # alive in the lowered code to the end of backward. On the H100 that held the 1.5B's 445 MiB LM-head
    # gradient through its whole backward, the measured peak (docs/memory.md, "Thirteenth session").
    for i, _, _ in candidates:
        outs[nfwd + i] = None
    out.args = (tuple(outs),)
    order = list(graph.nodes)
    by_index = {i: (info, b) for i, info, b in candidates}
    groups = plan_groups([(max(pos[grads[i]], last.get(i, -1)), i, b, grad_nbytes(grads[i]))
                          for i, info, b in candidates], int(group_bytes))
    # a group runs where its last member's update would have: after every member's gradient and reads
    by_anchor: dict[int, list[list]] = {}
    for grp in groups:
        by_anchor.setdefault(grp[-1][0], []).append(grp)
    for at in sorted(by_anchor):
        anchor = order[at]
        for grp in reversed(by_anchor[at]):  # inserting_after reverses: keep update order
            idx = [u[1] for u in grp]
            live: dict[torch.fx.Node, None] = {}
            for i in idx:
                live.update(dict.fromkeys(_live_across(graph, pos, dep, bw, i, at)))
            live_list = sorted(live, key=pos.__getitem__)
            b = grp[0][2]
            names = [by_index[i][0].name for i in idx]
            slots = [fusion.slot_for(by_index[i][0].tensor, b) for i in idx]
            with graph.inserting_after(anchor):
                if group_bytes > 0:
                    node = graph.call_function(gop, ([primals[i] for i in idx], [grads[i] for i in idx], names,
                                                     slots, live_list))
                else:
                    node = graph.call_function(op, (primals[idx[0]], grads[idx[0]], names[0], slots[0], live_list))
            node.meta["val"] = None
            pos[node] = at  # it runs right after its anchor: later _live_across calls see it as a user there
            _compat.tag_must_be_in_backward(node)
            rec = ufx(node)
            rec.param = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
            rec.notes["fused_update"] = True
            if len(names) > 1 or group_bytes > 0:
                rec.notes["group"] = {"params": names, "grad_bytes": sum(u[3] for u in grp)}
            if b.accumulation_steps > 1:
                rec.notes["accumulation_steps"] = b.accumulation_steps
            stats["fused"] += len(idx)
    stats["update_calls"] = len(groups)
    stats["group_bytes"] = int(group_bytes)
    graph.lint()
    gm.recompile()
    accum = {b.accumulation_steps for _, _, b in candidates}
    if max(accum) > 1:
        stats["accumulation"] = (f"{max(accum)} micro-batches: gradients kept in param.grad for the first "
                                 f"{max(accum) - 1}, update fused into the last backward")
    stats["clip"] = sorted({str(b.clip) for _, _, b in candidates})
    return PassResult(gm, True, stats)


def update_order_violations(gm: torch.fx.GraphModule) -> list[str]:
    """For a backward (or joint) graph: every fused update (either op) whose parameter,
    or a view of it (same storage), is read after the update. Empty when placement is right."""
    nodes = list(gm.graph.nodes)
    bad = []
    for k, n in enumerate(nodes):
        for w, _, name in update_members(n):
            store = _compat.node_storage(w)
            aliases = {m for m in nodes if m is w or (store is not None and _compat.node_storage(m) == store)}
            for m in nodes[k + 1:]:
                if any(a in aliases for a in m.all_input_nodes):
                    bad.append(f"{m.name} reads {name} after its update {n.name}")
    return bad


# route 2 of issue 6 lives in its own pass file; importing it here registers it with the built-in passes
from unsloth_fx.passes import rewrite_optimizer_step as _rewrite_optimizer_step  # noqa: E402,F401
