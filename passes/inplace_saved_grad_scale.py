"""Pass `inplace_saved_grad_scale`: scale the fused LM head's saved gradients in place in backward.

Backward stage. The fused LM-head + cross-entropy op (``runtime/linear_cross_entropy.py``) computes
``grad_hidden`` and ``grad_weight`` in the forward; autograd saves them and the op's backward only
multiplies them by the incoming loss gradient. Traced, that multiply is
``unsloth_fx.lce_grad_scale(saved, grad_loss)`` (functional, a new buffer), so at the start of
backward two ``vocab x hidden`` copies of the LM-head weight gradient are alive (445 MiB each for
R1-Distill-Qwen-1.5B in bf16). The pass rewrites, in the backward graph::

    m = unsloth_fx.lce_grad_scale(x, s)   # x: a placeholder (a saved tensor), or alias/detach of one
    ... readers of m ...

into ``unsloth_fx.scale_(x, s)`` (``x *= s``, returns nothing) followed by the same readers reading
``x``, when ``x`` has no other reader and ``s`` is 0-d. Values are identical: ``scale_`` runs
``x.mul_(s)``, the same kernel and rounding as ``x * s``.

Design (why not the alternatives):

- Not in place in the op's backward formula: AOTAutograd functionalizes the traced backward, so an
  in-place op there comes out as an out-of-place one again (a custom mutating op becomes
  ``auto_functionalized``: clone + mutate under ``lower="eager"``; Inductor does not re-inplace it,
  because in the partitioned backward graph the saved tensor is a graph input). The formula only
  emits the distinct functional op ``lce_grad_scale``, which marks the multiply's provenance.
- Not at the joint stage: ``scale_`` returns nothing, so its readers would lose their data
  dependency on the tangent and the partitioner would move them into the forward graph, where they
  read the unscaled value (checked: wrong gradients). After partitioning the graph order is final
  up to lowering, and Inductor orders readers of a mutated buffer after the mutation.
- Not ``aten.mul_``: the verifier keeps aten graphs functional, and an Inductor-generated kernel
  would not bump the saved tensor's version counter. ``scale_`` runs as an extern kernel (the real
  ``mul_``) under Inductor too, so a second backward through the same graph (``retain_graph=True``)
  raises autograd's "modified by an inplace operation" error when it unpacks the saved tensor,
  instead of silently using already scaled values.
- Inductor ordering: nothing reads ``x`` before ``scale_`` (single use), and ``s`` is an input of
  an extern op, so it is materialized before it: no ``after`` list is needed (contrast
  ``fuse_optimizer``, whose parameter has pending readers when it is mutated).

The memory model plans the joint graph before this pass exists (``plan_memory`` is a joint pass);
``unsloth_fx.memory.model`` credits the same in-place fact on its own partition (see
``Static.inplace_grad_scale``).

Semantics: the saved gradient is consumed (as in the eager backward, which scales in place too).
Deterministic (graph order) and idempotent (a rewritten node is no longer ``lce_grad_scale``).
"""

from __future__ import annotations

import torch
import torch.fx

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx

SCALE_OP = "unsloth_fx.lce_grad_scale.default"


def _ops():
    import unsloth_fx.runtime.linear_cross_entropy  # noqa: F401  (registers the two ops)

    return torch.ops.unsloth_fx.lce_grad_scale.default, torch.ops.unsloth_fx.scale_.default


# identity views: same storage, shape, strides and values
ALIAS_OPS = ("aten.alias.default", "aten.detach.default")


LCE_OP = "unsloth_fx.linear_cross_entropy.default"


def _recomputed_lce_output(x: torch.fx.Node) -> bool:
    """``x`` is an output (a getitem) of ``linear_cross_entropy`` run again in this backward graph (a
    plan recomputed it): a fresh buffer of its own, which the scale may overwrite like a saved one."""
    if x.op != "call_function" or getattr(x.target, "__name__", "") != "getitem" or not x.args:
        return False
    src = x.args[0]
    return isinstance(src, torch.fx.Node) and str(src.target) == LCE_OP


def saved_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor ``node``'s first argument is, seen through a chain of ``aten.alias`` /
    ``aten.detach`` nodes each read only by the next (the partitioner re-derives such views of a
    saved tensor in the backward when the joint graph carries save/recompute tags, as a planned
    graph does), when it is a graph input (a saved tensor) or an output of the fused LM-head op
    recomputed in this graph; None otherwise."""
    x = node.args[0] if node.args else None
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and str(x.target) in ALIAS_OPS \
            and len(x.users) == 1 and x.args:
        x = x.args[0]
    if not isinstance(x, torch.fx.Node):
        return None
    return x if x.op == "placeholder" or _recomputed_lce_output(x) else None


def match(node: torch.fx.Node) -> bool:
    """Whether ``node`` is ``lce_grad_scale(x, s)`` with ``x`` a graph input (a saved tensor) or a
    recomputed output of the LM-head op, or an identity-view chain of one (:func:`saved_input`),
    read by nothing else, ``s`` 0-d, and the
    result of ``x``'s shape and dtype."""
    if node.op != "call_function" or str(node.target) != SCALE_OP or len(node.args) != 2:
        return False
    x, s = node.args
    if not (isinstance(x, torch.fx.Node) and isinstance(s, torch.fx.Node)):
        return False
    x = saved_input(node)
    if x is None or len(x.users) != 1:
        return False
    vx, vs, vm = x.meta.get("val"), s.meta.get("val"), node.meta.get("val")
    if not all(isinstance(v, torch.Tensor) for v in (vx, vs, vm)) or vs.dim() != 0:
        return False
    return vm.dtype == vx.dtype and tuple(vm.shape) == tuple(vx.shape)


@graph_pass(name="inplace_saved_grad_scale", stage="backward")
def inplace_saved_grad_scale(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Scale the fused LM head's saved ``grad_hidden`` / ``grad_weight`` in place in backward
    instead of multiplying into a second buffer (see the module docstring)."""
    graph = gm.graph
    rewritten: list[str] = []
    nbytes = 0
    for node in list(graph.nodes):
        if not match(node):
            continue
        arg, s = node.args
        x = saved_input(node)
        with graph.inserting_before(node):
            new = graph.call_function(_ops()[1], (x, s))
        # returns nothing (no meta["val"]); the scaled value's readers read x, after it in graph order
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta", "ufx")})
        ufx(new).notes["in_place_scale_of"] = x.name
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        while arg is not x and not arg.users:  # the alias chain (identity views) is dead now
            nxt = arg.args[0]
            graph.erase_node(arg)
            arg = nxt
        v = x.meta["val"]
        nbytes += v.numel() * v.element_size()
        rewritten.append(f"{new.name}: {x.name}")
    if rewritten:
        graph.lint()
        gm.recompile()
    return PassResult(gm, bool(rewritten), {"rewritten": len(rewritten), "nodes": rewritten,
                                            "bytes_not_copied": int(nbytes)})
