"""Seed pass `fuse_optimizer`: registered, analyse-only until its issue lands."""

from __future__ import annotations

import torch.fx

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass


@graph_pass(name="fuse_optimizer", stage="joint")
def fuse_optimizer(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Not implemented yet: leaves the graph unchanged and says so."""
    return PassResult(gm, False, {"status": "not yet active"})
