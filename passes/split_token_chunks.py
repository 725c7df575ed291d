"""Pass `split_token_chunks` (pre_grad): run each token-wise region in chunks along the sequence.

Regions (Dynamo graph, torch-level ops):

1. Gated MLP (Qwen2, Llama, the DeepSeek-V3 dense MLP)::

       y = linear(act(linear(x, Wg)) * linear(x, Wu), Wd)        # SwiGLU / GeGLU, no biases

2. A whole MoE block whose routing is per token (``TOKENWISE_MOE``: transformers'
   ``DeepseekV3MoE``): router (sigmoid scores, grouped top-k), routed experts
   (sort by expert, gather, grouped GEMMs, weighting, un-permute, sum) and the
   shared expert, from the block input ``x`` to its output. Each token's output
   depends on that token's row of ``x`` only, but the graph sorts and gathers
   *across* tokens, so no op-level pattern proves it; the block's module class
   does (see docs/chunking.md for what qualifies).

Both are rewritten the same way::

    x_0..x_{k-1} = tensor_split(x, k, dim=-2)                  # token (sequence) chunks
    y_i = region(x_i)                                          # one copy of the region per chunk
    y = cat(y_0..y_{k-1}, dim=-2)

What changes is the *joint* graph AOTAutograd traces from it: chunk i's
backward reads only chunk i's activations, and each weight gradient becomes a
sum of per-chunk contributions. Each chunk's intermediates carry
``meta["recompute"] = MUST_RECOMPUTE`` (copied by AOTAutograd onto the aten
nodes they trace to) and ``meta["custom"]["ufx_region"/"ufx_chunk"/"ufx_chunks"]``,
which ``chunk_recompute`` (joint stage) turns into ``UfxMeta`` and checks.

MoE copies need their shape constants rewritten: with static shapes Dynamo
bakes ``view(B, S, H)``, ``view(T, top_k, H)`` and ``arange(T * top_k)`` into
the graph (T = B * S). Integer arguments equal to S, T or T * top_k become the
chunk's values; a block where one of those numbers also names a
token-independent size (a weight dim, the batch, a top-k) is skipped, and every
copied node is fake-run and its shape checked against the expected chunk shape,
so a wrong substitution is refused, not computed. Dynamic sequence lengths
(SymInt sizes) are left unchunked for MoE blocks.

Chunk count per region: the memory plan's count for ``"mlp"`` / ``"moe"``, else
the ``chunks`` option: an int, or ``"auto"`` (``chunk_recompute.resolve_chunks``:
from the region's intermediate bytes per sequence position and the
``memory_budget``). Regions shorter than the chunk count run with empty chunks
(``tensor_split`` semantics; MoE blocks cap the count at the sequence length).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx
from unsloth_fx.passes.chunk_recompute import parse_chunks, resolve_chunks

_LINEAR = _compat.LINEAR_TARGETS
_ACTS = {torch.nn.functional.silu, torch.nn.functional.gelu, torch.sigmoid, torch.nn.functional.relu}
_MUL = {operator.mul, torch.mul}

# MoE block classes whose output for a token depends only on that token: routing scores and top-k are
# per token, there is no expert capacity (no token dropped because of other tokens), no auxiliary loss
# and no randomness. Add a class here only after checking its forward for all of that.
TOKENWISE_MOE = frozenset({"DeepseekV3MoE"})


def _val(n: Any) -> Any:
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, torch.fx.Node) else None


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return _compat.symint_hint(v.numel())[0] * v.element_size() if v.numel() is not None else 0
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    return 0


def _linear_of(n: object, x: torch.fx.Node | None = None) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _LINEAR
            and 2 <= len(n.args) <= 3 and all(a is None for a in [*n.args[2:], *n.kwargs.values()])
            and (x is None or n.args[0] is x))


def _act_input(n: object) -> torch.fx.Node | None:
    """``act(z)`` -> z, for a call_function act or an activation module's functional call."""
    if isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in _ACTS and len(n.args) >= 1:
        return n.args[0]
    return None


def _match_mlp(down: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
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


# ---------------------------------------------------------------- MoE blocks

class _MoE:
    """A token-wise MoE block found in the graph."""

    def __init__(self, path: str, x: torch.fx.Node, nodes: list[torch.fx.Node], hoisted: set[torch.fx.Node],
                 out: torch.fx.Node, consts: dict[int, str]):
        self.path, self.x, self.nodes, self.hoisted, self.out = path, x, nodes, hoisted, out
        self.consts = consts  # int constant -> "S" | "T" | "Tk<top_k>": which token count it is


def _moe_path(n: torch.fx.Node) -> str | None:
    for path, cls in (n.meta.get("nn_module_stack") or {}).values():
        name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].rstrip("'>"))
        if name in TOKENWISE_MOE:
            return path
    return None


def _find_moe(g: torch.fx.Graph, params: set[torch.fx.Node]) -> tuple[list[_MoE], list[str]]:
    """Token-wise MoE blocks of ``g`` and, for blocks left alone, why."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for n in g.nodes:
        if n.op in ("call_function", "call_method") and not (n.meta.get("custom") or {}).get("ufx_region"):
            p = _moe_path(n)
            if p is not None:
                groups.setdefault(p, []).append(n)
    found, skipped = [], []
    for path, nodes in groups.items():
        m = _moe_region(path, nodes, params)
        (found if isinstance(m, _MoE) else skipped).append(m if isinstance(m, _MoE) else f"{path}: {m}")
    return found, skipped


def _moe_region(path: str, nodes: list[torch.fx.Node], params: set[torch.fx.Node]) -> _MoE | str:
    members = set(nodes)
    # Nodes computed from weights only (``w.type(float32)``, ``w.transpose(-2, -1)``) are shared by all chunks.
    hoisted: set[torch.fx.Node] = set()
    for n in nodes:
        ins = n.all_input_nodes
        if ins and all(a in params or a in hoisted for a in ins):
            hoisted.add(n)
    body = [n for n in nodes if n not in hoisted]
    outside = {a for n in body for a in n.all_input_nodes if a not in members}
    tokens_in = [a for a in outside if a not in params]
    if len(tokens_in) != 1:
        return f"{len(tokens_in)} non-weight inputs (expected the block input only)"
    x = tokens_in[0]
    outs = [n for n in body if any(u not in members for u in n.users)]
    if len(outs) != 1 or any(u not in members for h in hoisted for u in h.users):
        return "more than one value leaves the block"
    out, xv, ov = outs[0], _val(x), _val(outs[0])
    if not (isinstance(xv, torch.Tensor) and isinstance(ov, torch.Tensor) and xv.dim() >= 2
            and tuple(ov.shape) == tuple(xv.shape)):
        return "block output does not have the input's shape"
    if not all(isinstance(d, int) for d in xv.shape):
        return "dynamic token count (SymInt sizes): shape constants cannot be checked"
    S, T = xv.shape[-2], math.prod(xv.shape[:-1])
    batch = T // S if S else 0
    tops = sorted({int(n.kwargs.get("k", n.args[1] if len(n.args) > 1 else 0)) for n in body
                   if n.target in (torch.topk, "topk")})
    consts: dict[int, str] = {S: "S", T: "T"}
    for kk in tops:
        consts.setdefault(T * kk, f"T*{kk}")
    fixed = {int(d) for p in (outside - {x}) | hoisted if isinstance(_val(p), torch.Tensor) for d in _val(p).shape}
    fixed |= set(tops) | {xv.shape[-1]} | ({batch} if batch > 1 else set())
    clash = sorted(set(consts) & fixed)
    if clash:
        return f"token count(s) {clash} also name a token-independent size; cannot rewrite shape constants"
    return _MoE(path, x, body, hoisted, out, consts)


def _chunk_const(v: Any, moe: _MoE, s_i: int) -> Any:
    """A shape constant of the full block -> the same constant for a chunk of ``s_i`` positions."""
    if isinstance(v, bool) or not isinstance(v, int) or v not in moe.consts:
        return v
    full = _val(moe.x).shape
    S = full[-2]
    return v // S * s_i  # S, T = B*S and T*top_k all scale with the positions in the chunk


# ---------------------------------------------------------------- rewriting

def _region_bytes_per_position(nodes: list[torch.fx.Node], x: torch.fx.Node) -> float:
    """Bytes of the region's recomputed intermediates (every node but the output) per position of x's
    dim -2: an upper bound on one chunk's working set (they are not all alive at once)."""
    xv = _val(x)
    S = _compat.symint_hint(xv.shape[-2])[0] if isinstance(xv, torch.Tensor) and xv.dim() >= 2 else None
    total = sum(_nbytes(_val(n)) for n in nodes[:-1])
    return total / S if S else float(total)


def _split(g: torch.fx.Graph, x: torch.fx.Node, nodes: list[torch.fx.Node], k: int, rid: str,
           at: torch.fx.Node, moe: _MoE | None) -> str | None:
    """Insert k chunk copies of ``nodes`` before ``at`` and route the output's users to their cat.
    Returns None, or why the MoE copy was refused (the graph is then left as it was)."""
    policy = _compat.checkpoint_policy().MUST_RECOMPUTE
    xv = _val(x)
    mode = getattr(xv, "fake_mode", None)
    sizes = None
    if isinstance(xv, torch.Tensor) and xv.dim() >= 2 and isinstance(xv.shape[-2], int):
        S = xv.shape[-2]
        sizes = [S // k + (1 if i < S % k else 0) for i in range(k)]
    new: list[torch.fx.Node] = []
    with g.inserting_before(at):
        split = g.call_function(torch.tensor_split, (x, k), {"dim": -2})
        new.append(split)
        outs = []
        for i in range(k):
            xi = g.call_function(operator.getitem, (split, i))
            new.append(xi)
            vals: dict[torch.fx.Node, Any] = {}
            if mode is not None:
                with mode:
                    vals[xi] = torch.tensor_split(xv, k, dim=-2)[i]
            if moe is not None:
                # A sequence chunk of [B, S, H] is not contiguous for B > 1, and the block flattens its input
                # with view(-1, H). The copy belongs to the chunk (recomputed, never saved).
                xi = g.call_method("contiguous", (xi,))
                new.append(xi)
                xi.meta["custom"] = {"ufx_region": rid, "ufx_chunk": i, "ufx_chunks": k}
                xi.meta["recompute"] = policy
                if mode is not None:
                    with mode:
                        vals[xi] = vals[new[-2]].contiguous()
                    xi.meta["example_value"] = vals[xi]
            env: dict[torch.fx.Node, Any] = {x: xi}
            for n in nodes:
                if moe is None:
                    c = g.node_copy(n, lambda a: env.get(a, a))
                else:
                    c = g.create_node(n.op, n.target,
                                      torch.fx.node.map_aggregate(n.args, lambda a: env.get(a, _chunk_const(a, moe, sizes[i])) if not isinstance(a, torch.fx.Node) else env.get(a, a)),
                                      torch.fx.node.map_aggregate(n.kwargs, lambda a: env.get(a, _chunk_const(a, moe, sizes[i])) if not isinstance(a, torch.fx.Node) else env.get(a, a)),
                                      name=n.name)
                new.append(c)
                c.meta = {key: v for key, v in n.meta.items() if key not in ("example_value", "val", "ufx")}
                c.meta["custom"] = {**n.meta.get("custom", {}), "ufx_region": rid, "ufx_chunk": i, "ufx_chunks": k}
                if n is not nodes[-1]:  # the chunk's output is cat'ed and flows on; the rest is recomputed
                    c.meta["recompute"] = policy
                env[n] = c
                if moe is not None:
                    why = _fake_run(c, n, vals, moe, sizes[i])
                    if why is not None:
                        for m in reversed(new):
                            g.erase_node(m)
                        return f"{moe.path}: {why}"
            outs.append(env[nodes[-1]])
        y = g.call_function(torch.cat, (outs,), {"dim": -2})
    y.meta["custom"] = {"ufx_region": rid, "ufx_chunk_cat": True, "ufx_chunks": k}
    for n in (split, y):
        rec = ufx(n)
        rec.region, rec.decision = rid, "chunk"
        rec.notes["chunks"] = k
    nodes[-1].replace_all_uses_with(y)
    for n in reversed(nodes):
        g.erase_node(n)
    return None


def _fake_run(c: torch.fx.Node, n: torch.fx.Node, vals: dict[torch.fx.Node, Any], moe: _MoE, s_i: int) -> str | None:
    """Run the copy ``c`` on fake values; its value must have ``n``'s shape with token counts rescaled."""
    def arg(a: Any) -> Any:
        return vals.get(a, _val(a)) if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(c.args, arg)
    kwargs = torch.fx.node.map_aggregate(c.kwargs, arg)
    mode = getattr(_val(moe.x), "fake_mode", None)
    try:
        with mode:
            if c.op == "call_method":
                v = getattr(args[0], c.target)(*args[1:], **kwargs)
            else:
                v = c.target(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure means the substituted constants are wrong
        return f"chunk copy of {n.name} does not run: {type(e).__name__}: {str(e)[:120]}"
    vals[c] = v
    c.meta["example_value"] = v
    want, got = _val(n), v
    for w, h in zip(want if isinstance(want, (tuple, list)) else [want], got if isinstance(got, (tuple, list)) else [got]):
        if isinstance(w, torch.Tensor):
            exp = tuple(_chunk_const(d, moe, s_i) for d in w.shape)
            if not isinstance(h, torch.Tensor) or tuple(h.shape) != exp:
                return f"chunk copy of {n.name} has shape {tuple(getattr(h, 'shape', ()))}, expected {exp}"
    return None


def _param_nodes(gm: torch.fx.GraphModule, ctx: PassContext) -> set[torch.fx.Node]:
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {ph[i] for i in ctx.params if i < len(ph)}
    out |= {n for n in ph if isinstance(_val(n), torch.nn.Parameter)
            or any(k in (_compat.placeholder_source_name(n) or "") for k in ("_parameters[", "_buffers["))
            # Dynamo names lifted module state ``..._parameters_<name>_`` / ``..._buffers_<name>_``.
            or "_parameters_" in n.name or "_buffers_" in n.name}
    out |= {n for n in gm.graph.nodes if n.op == "get_attr"}
    return out


@graph_pass(name="split_token_chunks", stage="pre_grad", options={"chunks": "4"})
def split_token_chunks(gm: torch.fx.GraphModule, ctx: PassContext, chunks: Any) -> PassResult:
    """Split every token-wise region (gated MLPs, token-wise MoE blocks) into token chunks.

    ``chunks``: an int >= 1 or ``"auto"``. Stats: ``regions``, ``chunks`` (the option), ``chunks_per_region``
    (``{region id: count}``), ``auto`` (per region, how "auto" chose), ``skipped`` (MoE blocks left
    alone, with the reason)."""
    option = parse_chunks(chunks, "split_token_chunks")
    g = gm.graph
    per_region: dict[str, int] = {}
    auto: dict[str, Any] = {}
    skipped: list[str] = []

    def count(kind: str, rid: str, x: torch.fx.Node, nodes: list[torch.fx.Node]) -> int:
        xv = _val(x)
        units = _compat.symint_hint(xv.shape[-2])[0] if isinstance(xv, torch.Tensor) and xv.dim() >= 2 else 1
        k, info = resolve_chunks(ctx, kind, option, units or 1, _region_bytes_per_position(nodes, x),
                                 "split_token_chunks")
        if info["source"] == "auto":
            auto[rid] = info
        return k

    moes, why = _find_moe(g, _param_nodes(gm, ctx))
    skipped += why
    for moe in moes:
        rid = f"moe_{sum(r.startswith('moe_') for r in per_region)}"
        S = _val(moe.x).shape[-2]
        k = min(count("moe", rid, moe.x, moe.nodes), S)
        if k <= 1:
            auto.pop(rid, None) if k < 1 else None
            per_region[rid] = 1
            continue
        refused = _split(g, moe.x, moe.nodes, k, rid, moe.nodes[-1], moe)
        if refused:
            skipped.append(refused)
            auto.pop(rid, None)
        else:
            per_region[rid] = k
    mlps = 0
    for down in list(g.nodes):
        m = _match_mlp(down)
        if m is None:
            continue
        x, nodes = m
        rid = f"mlp_{mlps}"
        mlps += 1
        k = count("mlp", rid, x, nodes)
        per_region[rid] = k
        if k > 1:
            _split(g, x, nodes, k, rid, nodes[0], None)
    done = {r: k for r, k in per_region.items() if k > 1}
    if done:
        g.lint()
        gm.recompile()
    stats: dict[str, Any] = {"regions": len(done), "chunks": option, "chunks_per_region": per_region}
    if auto:
        stats["auto"] = auto
    if skipped:
        stats["skipped"] = skipped
    return PassResult(gm, bool(done), stats)
