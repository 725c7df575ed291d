"""Pass `split_token_chunks` (pre_grad): run each gated MLP region in chunks along the sequence.

Region (Dynamo graph, torch-level ops)::

    y = linear(act(linear(x, Wg)) * linear(x, Wu), Wd)        # SwiGLU / GeGLU MLP, no biases
  ->
    x_0..x_{k-1} = tensor_split(x, k, dim=-2)                  # token (sequence) chunks
    y_i = linear(act(linear(x_i, Wg)) * linear(x_i, Wu), Wd)   # one copy of the region per chunk
    y = cat(y_0..y_{k-1}, dim=-2)

Every op in the region is independent across tokens, so the chunks compute the
same values; what changes is the *joint* graph AOTAutograd traces from it:
chunk i's backward reads only chunk i's activations, and each weight gradient
becomes a sum of per-chunk contributions. Each chunk's intermediates carry
``meta["recompute"] = MUST_RECOMPUTE`` (copied by AOTAutograd onto the aten
nodes they trace to) and ``meta["custom"]["ufx_region"/"ufx_chunk"]``, which
``chunk_recompute`` (joint stage) turns into ``UfxMeta`` and checks.

Chunk count: ``planned_chunks(ctx, "mlp", chunks)``. Regions shorter than the
chunk count run with empty chunks (``tensor_split`` semantics), which is
correct but pointless; dynamic sequence lengths work because ``tensor_split``
takes the count, not the size. MoE expert FFNs (data-dependent token routing)
are not matched.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass
from unsloth_fx.passes.chunk_recompute import planned_chunks

_LINEAR = _compat.LINEAR_TARGETS
_ACTS = {torch.nn.functional.silu, torch.nn.functional.gelu, torch.sigmoid, torch.nn.functional.relu}
_MUL = {operator.mul, torch.mul}


def _linear_of(n: object, x: torch.fx.Node | None = None) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _LINEAR
            and 2 <= len(n.args) <= 3 and all(a is None for a in [*n.args[2:], *n.kwargs.values()])
            and (x is None or n.args[0] is x))


def _act_input(n: object) -> torch.fx.Node | None:
    """``act(z)`` -> z, for a call_function act or an activation module's functional call."""
    if isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _ACTS and len(n.args) >= 1:
        return n.args[0]
    return None


def _match(down: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(x, region nodes in graph order, ``down`` last) for a gated MLP ending in ``down``."""
    if not _linear_of(down) or down.meta.get("custom", {}).get("ufx_region"):
        return None
    mul = down.args[0]
    if not (isinstance(mul, torch.fx.Node) and mul.op == "call_function" and mul.target in _MUL
            and len(mul.args) == 2):
        return None
    a, b = mul.args
    for act, up in ((a, b), (b, a)):
        gate = _act_input(act)
        if _linear_of(gate) and _linear_of(up) and gate.args[0] is up.args[0]:
            inner = [gate, act, up, mul]
            if all(len(n.users) == 1 for n in inner):
                order = {n: i for i, n in enumerate(down.graph.nodes)}
                return gate.args[0], sorted([*inner, down], key=order.__getitem__)
    return None


@graph_pass(name="split_token_chunks", stage="pre_grad", options={"chunks": 4})
def split_token_chunks(gm: torch.fx.GraphModule, ctx: PassContext, chunks: int) -> PassResult:
    """Split every gated-MLP region into ``chunks`` token chunks (stats: ``regions``, ``chunks``)."""
    if chunks < 1:
        raise ValueError(f"split_token_chunks: chunks={chunks} must be >= 1")
    k = planned_chunks(ctx, "mlp", chunks)
    if k == 1:
        return PassResult(gm, False, {"regions": 0, "chunks": 1})
    g = gm.graph
    policy = _compat.checkpoint_policy().MUST_RECOMPUTE
    regions = 0
    for down in list(g.nodes):
        m = _match(down)
        if m is None:
            continue
        x, nodes = m
        rid = f"mlp_{regions}"
        with g.inserting_before(nodes[0]):
            split = g.call_function(torch.tensor_split, (x, k), {"dim": -2})
            outs = []
            for i in range(k):
                xi = g.call_function(operator.getitem, (split, i))
                env = {x: xi}
                for n in nodes:
                    c = g.node_copy(n, lambda a: env.get(a, a))
                    c.meta = {key: v for key, v in n.meta.items() if key not in ("example_value", "val")}
                    c.meta["custom"] = {**n.meta.get("custom", {}), "ufx_region": rid, "ufx_chunk": i}
                    if n is not nodes[-1]:  # the chunk's output is cat'ed and flows on; the rest is recomputed
                        c.meta["recompute"] = policy
                    env[n] = c
                outs.append(env[nodes[-1]])
            y = g.call_function(torch.cat, (outs,), {"dim": -2})
        y.meta["custom"] = {"ufx_region": rid, "ufx_chunk_cat": True}
        nodes[-1].replace_all_uses_with(y)
        for n in reversed(nodes):
            g.erase_node(n)
        regions += 1
    if regions:
        g.lint()
        gm.recompile()
    return PassResult(gm, regions > 0, {"regions": regions, "chunks": k})
