"""Pass `plan_memory`: predict the training step's memory and plan it to ``memory_budget``.

Without a budget it only reports the predicted peak (modified=False). With one it
runs the scheduler (unsloth_fx.memory.schedule), which tags forward nodes
``meta["recompute"] = MUST_RECOMPUTE / MUST_SAVE`` and ``ufx(node).decision``,
so the min-cut partitioner carries the plan out; a budget above the predicted
peak changes nothing. Values the plan offloads to host are tagged MUST_SAVE with
``decision="offload"``; offload_activations / reload_activations move them after
partitioning. The plan object is left in ``ctx.shared["memory_plan"]`` for
chunk_recompute and reload_activations, and the schedule files in ``ctx.artifacts``.

The static model credits only what the compile's pipeline (``ctx.options.pipeline``, the string the
backend parsed) will run after this pass: the fused optimizer update when ``fuse_optimizer=True`` and
the pipeline has the ``fuse_optimizer`` pass, with that pass's ``group_bytes`` (the bytes of gradients
a group keeps waiting for its update); the in-place scale of the fused LM head's saved gradients when
it has the ``inplace_saved_grad_scale`` pass. The Static used is left in
``ctx.shared["memory_static"]``, and its ``fuse_optimizer`` / ``fuse_group_bytes`` (bytes; None when
not fused) / ``inplace_grad_scale`` are in the stats.

Options: ``optimizer``, ``keep_outputs``, ``offload`` (let the solver offload),
``h2d_gbps`` / ``d2h_gbps`` (host link, GB/s = 1e9 bytes/s each way),
``force_offload`` (node names joined by ``+``, or ``all``: offload these
whatever the cost; a test and debugging hook).
"""

from __future__ import annotations

import torch
import torch.fx

from unsloth_fx.memory import allocator as A
from unsloth_fx.memory import model as M
from unsloth_fx.memory import report, schedule
from unsloth_fx.options import format_bytes
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass


# torch's default cuBLAS workspace on Hopper is 32 MiB per handle and stream (CUBLAS_WORKSPACE_CONFIG
# ":4096:8"); the reserve covers two (cuBLAS and cuBLASLt, or a second stream such as offload's).
CUDA_WORKSPACE_RESERVE = 64 * 2**20


def _device_total(ctx: PassContext) -> int | None:
    if ctx.device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(ctx.device).total_memory
    return None


def _pipeline_credits(ctx: PassContext) -> tuple[bool, int | None, bool]:
    """(fuse_optimizer, its group_bytes or None when not fused, inplace_grad_scale) as the compile's
    pipeline will run them: a pass the pipeline omits is not credited, and ``fuse_optimizer{group_bytes=N}``
    sizes the pending-gradient groups (the pass's default when not given)."""
    from unsloth_fx.pipeline import Pipeline

    passes = {spec.name: {**spec.options, **opts}
              for spec, opts in Pipeline.parse(str(getattr(ctx.options, "pipeline", "default"))).passes()}
    fuse = bool(getattr(ctx.options, "fuse_optimizer", False)) and "fuse_optimizer" in passes
    group_bytes = int(passes["fuse_optimizer"]["group_bytes"]) if fuse else None
    return fuse, group_bytes, "inplace_saved_grad_scale" in passes


@graph_pass(name="plan_memory", stage="joint", options={"optimizer": "adamw", "keep_outputs": False, "offload": True,
                                                       "h2d_gbps": 25.0, "d2h_gbps": 25.0, "force_offload": "",
                                                       "workspace_reserve": -1, "rounds": 6,
                                                       "layer_checkpoints": "fallback", "margin": 0.0,
                                                       "allocator": "auto"})
def plan_memory(gm: torch.fx.GraphModule, ctx: PassContext, optimizer: str = "adamw",
                keep_outputs: bool = False, offload: bool = True, h2d_gbps: float = 25.0,
                d2h_gbps: float = 25.0, force_offload: str = "", workspace_reserve: int = -1,
                rounds: int = 6, layer_checkpoints: str = "fallback", margin: float = 0.0,
                allocator: str = "auto") -> PassResult:
    """Predict the step's memory timeline; with a memory_budget, choose save/recompute/offload per activation.

    ``rounds``: how many time-optimal MILP rounds to try before the fallbacks (schedule.plan's
    ``max_rounds``). 0 goes straight to the fewest device bytes (offload wherever it lowers the
    peak, then recompute): for a budget known to need that plan, it skips solves that would miss.
    ``layer_checkpoints``: ``"fallback"``, ``"first"`` or ``"off"``: when to try rounds in which the
    residual stream between decoder layers is never recomputed (schedule.plan).
    ``margin``: the fraction of ``memory_budget`` held back for the static model's error; the plan
    aims at ``budget * (1 - margin)``, and at the budget itself (with a warning in the stats) where that
    is infeasible. 0 by default (docs/memory.md).
    ``allocator``: whether the static bytes count the CUDA caching allocator's block slack on the
    parameters and optimizer state (unsloth_fx.memory.allocator): ``"auto"`` (on CUDA, when
    ``PYTORCH_CUDA_ALLOC_CONF`` keeps the rules it models), ``"cuda"`` (always, e.g. to plan a GPU
    step on a CPU) or ``"none"``."""
    if layer_checkpoints not in schedule.LAYER_CHECKPOINTS:
        raise ValueError(f"plan_memory: layer_checkpoints={layer_checkpoints!r}; expected one of "
                         f"{', '.join(schedule.LAYER_CHECKPOINTS)}")
    if int(rounds) < 0 or (int(rounds) == 0 and not offload):
        raise ValueError(f"plan_memory: rounds={rounds!r} with offload={offload}: rounds must be 0 or more, "
                         "and 0 (the fewest device bytes) needs offload")
    if allocator not in ("auto", "cuda", "none"):
        raise ValueError(f"plan_memory: allocator={allocator!r}; expected 'auto', 'cuda' or 'none'")
    if not 0.0 <= float(margin) < 0.5:
        raise ValueError(f"plan_memory: margin={margin!r}; expected a fraction of the budget in [0, 0.5)")
    budget = ctx.options.resolve_budget(_device_total(ctx))
    full = budget
    if budget is not None and float(margin):
        budget = int(budget * (1.0 - float(margin)))
    nfwd = ctx.num_fwd_outputs or 1
    fuse, group_bytes, inplace = _pipeline_credits(ctx)
    static = M.static_from_graph(gm, optimizer, fuse, ctx.params, lower=str(getattr(ctx.options, "lower", "eager")),
                                 fuse_group_bytes=group_bytes, inplace_grad_scale=inplace)
    ctx.shared["memory_static"] = static
    # cuBLAS / cuBLASLt workspaces come from the caching allocator and count in max_memory_allocated,
    # but no graph node makes them: reserve them on CUDA (-1 = CUDA_WORKSPACE_RESERVE there, 0 elsewhere).
    # Evidence: an H100 run planned to 12 GiB measured 3.8 MB above it with no reserve (docs/memory.md).
    static.workspace = int(workspace_reserve) if workspace_reserve >= 0 else \
        (CUDA_WORKSPACE_RESERVE if ctx.device.type == "cuda" else 0)
    # the caching allocator gives parameters and optimizer state blocks larger than they are (87 MiB on
    # r1-distill-qwen-1.5b with per-tensor int4 state: the planner's whole error on an H100, docs/memory.md)
    if allocator == "cuda" or (allocator == "auto" and ctx.device.type == "cuda" and A.default_settings()):
        static.block_slack = A.block_slack(static.resident_requests)
    already = any(n.meta.get("ufx") is not None and n.meta["ufx"].decision not in (None, "", "chunk")
                  for n in gm.graph.nodes)  # chunk_recompute's "chunk" marks are not a plan
    try:
        dev = schedule.DeviceModel(h2d_bytes_per_s=h2d_gbps * 1e9, d2h_bytes_per_s=d2h_gbps * 1e9, offload=offload)
        forced = {t for t in force_offload.replace(" ", "+").split("+") if t}
        kw = dict(max_rounds=int(rounds), force_offload=forced or None, layer_checkpoints=layer_checkpoints)
        try:
            plan = schedule.plan(gm, nfwd, static, budget, dev, **kw)
        except schedule.InfeasibleBudget as e:
            if budget == full:
                raise
            # the margin is soft: a plan at the budget itself beats no plan (plan() tags nothing when it refuses)
            plan = schedule.plan(gm, nfwd, static, full, dev, **kw)
            plan.warnings.append(f"margin={margin} not kept: {format_bytes(budget)} ({float(margin):.1%} under "
                                 f"memory_budget) is infeasible (smallest feasible {format_bytes(e.smallest_feasible)}); "
                                 "planned to memory_budget itself")
            budget = full
    except schedule.InfeasibleBudget:
        raise
    except Exception as e:  # the prediction must never break a compile that asked for no budget
        if budget is not None:
            raise
        return PassResult(gm, False, {"status": f"prediction failed: {type(e).__name__}: {str(e)[:200]}"})
    ctx.shared["memory_plan"] = plan
    tl = plan.timeline
    summary = plan.summary()
    lines = [f"predicted peak {format_bytes(tl.peak)} ({tl.peak_phase}, at {tl.peak_node})",
             f"static: parameters {format_bytes(static.parameters + static.buffers)}, gradients "
             f"{format_bytes(static.gradients)}, optimizer state {format_bytes(static.optimizer_state)}"
             + (f", allocator block slack {format_bytes(static.block_slack)}" if static.block_slack else ""),
             f"saved activations {format_bytes(tl.saved_bytes)}"]
    if plan.recompute_flops:
        lines.append(plan.flops_line())
    if plan.offloaded_bytes:
        lines.append(f"offloaded to host {format_bytes(plan.offloaded_bytes)} (exposed transfer ~{plan.offload_s * 1e3:.3f} ms)")
    if budget is not None:
        lines.insert(0, f"budget {format_bytes(budget)}: {'feasible' if plan.feasible else 'infeasible'}")
    ctx.artifacts.update(report.artifacts(tl, budget=budget, feasible=plan.feasible, decisions=plan.decisions,
                                          summary=summary, title=f"graph {ctx.graph_id} memory schedule",
                                          summary_lines=lines))
    stats = {
        "predicted_peak": tl.peak, "predicted_peak_h": format_bytes(tl.peak), "baseline_peak": plan.baseline.peak,
        "saved_bytes": tl.saved_bytes, "budget": budget, "feasible": plan.feasible,
        "recompute": sum(1 for d in plan.decisions.values() if d == "recompute"),
        "offload": sum(1 for d in plan.decisions.values() if d == "offload"), "offloaded_bytes": plan.offloaded_bytes,
        "overhead_s": plan.overhead_s, "warnings": plan.warnings,
        "step_flops": plan.step_flops, "recompute_flops": plan.recompute_flops,
        "fuse_optimizer": static.fuse_optimizer, "fuse_group_bytes": static.fuse_group_bytes,
        "inplace_grad_scale": static.inplace_grad_scale, "block_slack": static.block_slack,
    }
    if already and not plan.modified:
        stats["note"] = "plan already applied"
    return PassResult(gm, plan.modified, stats)
