"""Seed pass `chunk_recompute` (joint stage). Work in progress: see below."""

from __future__ import annotations

from typing import Any

import torch.fx

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass


def planned_chunks(ctx: PassContext, region: str, default: int) -> int:
    """Chunk count for ``region`` ("lm_head", "mlp", ...) from the memory plan, else ``default``.

    Reads ``ctx.shared["memory_plan"]`` when a planner left one: a mapping or
    object with ``chunks`` = ``{region: int}`` (a ``"default"`` key applies to
    every region) or a plain int.
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


@graph_pass(name="chunk_recompute", stage="joint", options={"chunks": 4})
def chunk_recompute(gm: torch.fx.GraphModule, ctx: PassContext, chunks: int) -> PassResult:
    """Not implemented yet: leaves the graph unchanged and says so."""
    return PassResult(gm, False, {"status": "not yet active"})
