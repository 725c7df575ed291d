"""Seed pass `chunk_recompute`: registered, analyse-only until its issue lands."""

from __future__ import annotations

import torch.fx

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass


@graph_pass(name="chunk_recompute", stage="joint")
def chunk_recompute(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Not implemented yet: leaves the graph unchanged and says so."""
    return PassResult(gm, False, {"status": "not yet active"})
