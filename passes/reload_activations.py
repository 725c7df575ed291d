"""Pass `reload_activations` (backward stage): the backward half of
``offload_activations``. Each saved input that the forward graph returned as a
host copy (``ctx.shared["offloaded"]``: saved name -> host node name) becomes a
host placeholder, is copied back to its device at the prefetch point and awaited
right before its first use. See passes/offload_activations.py.
"""

from __future__ import annotations

import torch.fx

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass
from unsloth_fx.passes.offload_activations import reload_backward


@graph_pass(name="reload_activations", stage="backward")
def reload_activations(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Copy offloaded activations back to the device ahead of their first backward use."""
    offloaded = dict(ctx.shared.get("offloaded", {}))
    plan = ctx.shared.get("memory_plan")
    done = reload_backward(gm, offloaded, getattr(plan, "device_model", None))
    return PassResult(gm, bool(done), {"reloaded": sorted(done)})
