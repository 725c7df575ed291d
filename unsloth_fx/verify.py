"""The graph invariants every pass keeps, checked in one place.

After every pass (when ``verify`` is on):

1. ``graph.lint()`` passes (well-formed, topologically ordered).
2. Every placeholder and every call_function node whose value is a tensor
   carries its fake value (``meta["val"]``; Dynamo graphs: ``example_value``).
   A pass that adds a node must give it one.
3. Functional form: no in-place or out= aten ops in joint / forward /
   backward / inference graphs. Our own runtime ops (namespace ``unsloth_fx``)
   are the one exception: the fused optimizer updates weights in place, by design.
4. ``node.meta["ufx"]``, where present, is a well-formed ``UfxMeta``.
"""

from __future__ import annotations

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import UfxMeta


class GraphInvariantError(AssertionError):
    pass


# Ops that return no tensor and need no fake value.
_NO_VALUE_TARGETS = {"output"}


def _is_mutating(target: object) -> bool:
    if not isinstance(target, _compat.OpOverload):
        return False
    if target.namespace == "unsloth_fx":
        return False
    return bool(target._schema.is_mutable)


def verify_graph(gm: torch.fx.GraphModule, stage: str) -> None:
    """Raise ``GraphInvariantError`` naming the first node that breaks an invariant."""
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises RuntimeError / AssertionError
        raise GraphInvariantError(f"graph.lint() failed: {e}") from e
    aten_stage = stage != "pre_grad"
    for node in gm.graph.nodes:
        rec = node.meta.get("ufx")
        if rec is not None:
            if not isinstance(rec, UfxMeta):
                raise GraphInvariantError(f"node {node.name}: meta['ufx'] is {type(rec).__name__}, expected UfxMeta")
            try:
                rec.check()
            except ValueError as e:
                raise GraphInvariantError(f"node {node.name}: meta['ufx'] is malformed: {e}") from e
        if node.op in ("placeholder", "call_function") and aten_stage:
            if _compat.example_value(node) is None and "val" not in node.meta:
                if node.op == "call_function" and _returns_nothing(node):
                    continue
                raise GraphInvariantError(
                    f"node {node.name} ({node.op} {node.target}) has no meta['val']: a pass created it without a fake value"
                )
        if node.op == "call_function" and aten_stage and _is_mutating(node.target):
            raise GraphInvariantError(
                f"node {node.name} calls the mutating op {node.target}: graphs must stay functional"
            )


def _returns_nothing(node: torch.fx.Node) -> bool:
    t = node.target
    if isinstance(t, _compat.OpOverload):
        return len(t._schema.returns) == 0
    return False
