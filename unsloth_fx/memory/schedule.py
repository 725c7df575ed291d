"""Budget scheduler: per forward value choose save / recompute so the step fits a byte budget
at the least estimated time, solved as a MILP (scipy.optimize.milp, HiGHS).

Variables, per forward compute node j: keep_j (saved across the forward/backward
gap) and rec_j (recomputed in backward). Constraints:

* a value backward reads is kept or recomputed:       keep_j + rec_j >= 1
* recomputing j needs each forward input i of j:      keep_i + rec_i >= rec_j
  (parameters and graph inputs are always available)
* bytes kept across the gap fit what the budget leaves: sum_j keep_j * bytes_j <= L

Objective: minimize sum_j rec_j * seconds_j (FLOPs at the device's rate, or bytes
over memory bandwidth for memory-bound ops). The solution is written as
``meta["recompute"] = MUST_RECOMPUTE / MUST_SAVE`` tags, which the min-cut
partitioner honours; the plan is then checked by partitioning a copy and
predicting its timeline (model.predict). If the prediction exceeds the budget,
L is lowered by the excess and the MILP is solved again (a few rounds).

Offload (pinned host) and chunking are not chosen: nothing in the pipeline
executes an offload decision yet, and chunk decisions need the chunk_recompute
pass to materialize them. Both are reported as unavailable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.memory.model import Static, Timeline, forward_nodes, predict, round_block, storage_size
from unsloth_fx.options import format_bytes
from unsloth_fx.pass_base import ufx


@dataclass(frozen=True)
class DeviceModel:
    """Rates the cost model uses (defaults: one H100 SXM, bf16 dense)."""

    flops_per_s: float = 400e12
    mem_bytes_per_s: float = 2.0e12
    host_bytes_per_s: float = 25e9


class InfeasibleBudget(ValueError):
    """The budget cannot hold the step even with every activation recomputed."""

    def __init__(self, message: str, *, smallest_feasible: int, breakdown: dict[str, int]):
        super().__init__(message)
        self.smallest_feasible = smallest_feasible
        self.breakdown = breakdown


@dataclass
class Plan:
    """What the scheduler decided. ``decisions``: joint node name -> "save" | "recompute"."""

    budget: int | None
    feasible: bool
    modified: bool
    baseline: Timeline
    timeline: Timeline
    decisions: dict[str, str] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # region/node -> chunk count (for chunk_recompute)
    overhead_s: float = 0.0  # estimated extra seconds per step (recompute)
    step_s: float = 0.0  # estimated seconds of the step's compute
    rounds: int = 0
    unavailable: dict[str, str] = field(default_factory=lambda: dict(UNAVAILABLE))
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.decisions.values():
            counts[d] = counts.get(d, 0) + 1
        return {
            "budget": self.budget, "feasible": self.feasible, "modified": self.modified,
            "predicted_peak": self.timeline.peak, "baseline_peak": self.baseline.peak,
            "saved_bytes": self.timeline.saved_bytes, "decisions": counts,
            "overhead_s": self.overhead_s, "step_s": self.step_s, "rounds": self.rounds,
            "unavailable": self.unavailable, "warnings": self.warnings,
        }


UNAVAILABLE = {
    "offload": "not executed by any pass yet; never chosen",
    "chunk": "needs chunk_recompute to materialize chunk plans; never chosen",
}


def node_seconds(node: torch.fx.Node, dev: DeviceModel) -> float:
    """Estimated seconds to run ``node`` once: max(FLOPs / rate, bytes moved / bandwidth)."""
    val = node.meta.get("val")
    name = getattr(node.target, "__name__", str(node.target))
    flops = 0.0
    shapes = [a.meta.get("val") for a in node.all_input_nodes]
    shapes = [s for s in shapes if isinstance(s, torch.Tensor)]
    out = val[0] if isinstance(val, (tuple, list)) and val else val
    if isinstance(out, torch.Tensor) and shapes:
        if name.startswith(("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")):
            a = shapes[1] if name.startswith(("addmm", "baddbmm")) and len(shapes) > 1 else shapes[0]
            k = a.shape[-1] if a.dim() else 1
            flops = 2.0 * _hint(out.numel()) * _hint(k)
        elif "attention" in name:
            q, kk = shapes[0], shapes[1]
            flops = 4.0 * _hint(q.numel()) * _hint(kk.shape[-2])
    moved = sum(_hint(storage_size(s).nbytes) for s in shapes)
    if isinstance(out, torch.Tensor):
        moved += _hint(storage_size(out).nbytes)
    return max(flops / dev.flops_per_s, moved / dev.mem_bytes_per_s)


def _hint(x: Any) -> float:
    h, _ = _compat.symint_hint(x) if not isinstance(x, (int, float)) else (x, x)
    return float(h if h is not None else 0)


def _recomputable(n: torch.fx.Node) -> bool:
    t = n.target
    if not isinstance(t, _compat.OpOverload):
        return n.target.__name__ == "getitem" if hasattr(n.target, "__name__") else False
    if torch.Tag.nondeterministic_seeded in t.tags or t._schema.is_mutable:
        return False
    return True


def _tag(joint: torch.fx.GraphModule, decisions: dict[str, str]) -> None:
    policy = _compat.checkpoint_policy()
    for n in joint.graph.nodes:
        d = decisions.get(n.name)
        if d is None:
            continue
        n.meta["recompute"] = policy.MUST_RECOMPUTE if d == "recompute" else policy.MUST_SAVE
        ufx(n).decision = d


def solve(joint: torch.fx.GraphModule, num_fwd_outputs: int, limit: int, dev: DeviceModel,
          force_recompute: bool = False) -> dict[str, str] | None:
    """One MILP: keep at most ``limit`` bytes across the gap. Returns decisions or None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    fwd = forward_nodes(joint, num_fwd_outputs)
    fset = set(fwd)
    # multi-output ops (tuples) are candidates too: recomputing a getitem recomputes its op
    cand = [n for n in fwd if isinstance(n.meta.get("val"), (torch.Tensor, tuple, list))]
    idx = {n: i for i, n in enumerate(cand)}
    m = len(cand)
    if m == 0:
        return {}
    storage_first: dict[Any, torch.fx.Node] = {}
    size = np.zeros(m)
    cost = np.zeros(m)
    can_rec = np.ones(m)
    for n in cand:
        s = _compat.node_storage(n) if isinstance(n.meta.get("val"), torch.Tensor) else None
        base = storage_first.setdefault(s, n) if s is not None else n
        # a view costs its base's bytes when kept (it keeps the base alive)
        size[idx[n]] = round_block(storage_size(base.meta["val"]).nbytes)
        cost[idx[n]] = node_seconds(n, dev)
        if not _recomputable(n):
            can_rec[idx[n]] = 0
    # variables: keep[0:m], rec[m:2m]
    rows: list[tuple[dict[int, float], float, float]] = []
    for n in cand:
        i = idx[n]
        if any(u not in fset and u.op != "output" for u in n.users):  # read by backward
            rows.append(({i: 1.0, m + i: 1.0}, 1.0, np.inf))
        for a in n.all_input_nodes:
            if a in idx:  # recomputing n needs a
                j = idx[a]
                rows.append(({j: 1.0, m + j: 1.0, m + i: -1.0}, 0.0, np.inf))
    rows.append(({i: size[i] for i in range(m)}, -np.inf, float(limit)))
    A = lil_matrix((len(rows), 2 * m))
    lo, hi = np.zeros(len(rows)), np.zeros(len(rows))
    for r, (coef, l, h) in enumerate(rows):
        for k, v in coef.items():
            A[r, k] = v
        lo[r], hi[r] = l, h
    # objective: recompute seconds; a tiny byte term prefers fewer kept bytes among equal-time plans
    c = np.concatenate([size * 1e-15, cost + 1e-12])
    if force_recompute:
        c = np.concatenate([size, np.zeros(m)])
    # a tuple is never saved itself (its getitems are)
    can_keep = np.array([1.0 if isinstance(n.meta.get("val"), torch.Tensor) else 0.0 for n in cand])
    ub = np.concatenate([can_keep, can_rec])
    res = milp(c, constraints=[LinearConstraint(A.tocsr(), lo, hi)], integrality=np.ones(2 * m),
               bounds=Bounds(np.zeros(2 * m), ub), options={"time_limit": 60.0})
    if res.x is None:  # infeasible (or no solution within the time limit)
        return None
    x = np.round(res.x).astype(int)
    out: dict[str, str] = {}
    for n in cand:
        i = idx[n]
        if x[m + i]:
            out[n.name] = "recompute"
        elif x[i] and (size[i] > 0):
            out[n.name] = "save"
    return out


def _breakdown(static: Static, minimum: Timeline) -> tuple[dict[str, int], str]:
    acts = max(minimum.peak - static.resident - static.gradients, 0)
    bd = {"parameters": static.parameters + static.buffers, "gradients": static.gradients,
          "optimizer_state": static.optimizer_state, "inputs": static.inputs, "minimum_activations": acts}
    total = sum(bd.values())
    text = (f"parameters {format_bytes(bd['parameters'])} + gradients {format_bytes(bd['gradients'])} + "
            f"optimizer state {format_bytes(bd['optimizer_state'])} + inputs {format_bytes(bd['inputs'])} + "
            f"minimum activations {format_bytes(acts)} = {format_bytes(total)}")
    return bd, text


def minimum_plan(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static,
                 dev: DeviceModel) -> tuple[dict[str, str], Timeline]:
    """The lowest-peak plan among a few candidates, and its predicted timeline.

    Recomputing everything is not always the lowest peak: recomputed values are
    alive together in backward. Candidates: no tags (the partitioner's own choice),
    keep the fewest bytes, and the time-optimal MILP at 1/2 and 1/4 of the
    baseline's saved bytes."""
    base = predict(joint, num_fwd_outputs, static)
    best: tuple[dict[str, str], Timeline] = ({}, base)
    cands = [solve(joint, num_fwd_outputs, 2**62, dev, force_recompute=True)]
    cands += [solve(joint, num_fwd_outputs, int(base.saved_bytes * f), dev) for f in (0.5, 0.25)]
    for dec in cands:
        if not dec:
            continue
        tl = _predict_tagged(joint, num_fwd_outputs, static, dec)
        if tl.peak < best[1].peak:
            best = (dec, tl)
    return best


def _predict_tagged(joint, num_fwd_outputs, static, decisions) -> Timeline:
    saved_meta = {n.name: (n.meta.get("recompute"), n.meta.get("ufx")) for n in joint.graph.nodes}
    g = torch.fx.GraphModule(joint, joint.graph)  # same graph: tag, predict on a copy, untag
    try:
        _tag(g, decisions)
        return predict(g, num_fwd_outputs, static)
    finally:
        for n in joint.graph.nodes:
            rec, u = saved_meta[n.name]
            if rec is None:
                n.meta.pop("recompute", None)
            else:
                n.meta["recompute"] = rec
            if u is None:
                n.meta.pop("ufx", None)
            elif n.name in decisions:
                u.decision = None


def step_seconds(joint: torch.fx.GraphModule, dev: DeviceModel) -> float:
    """Estimated seconds of the whole joint graph (forward + backward)."""
    return sum(node_seconds(n, dev) for n in joint.graph.nodes if n.op == "call_function")


def plan(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static, budget: int | None,
         dev: DeviceModel | None = None, max_rounds: int = 6) -> Plan:
    """Plan ``joint`` to ``budget`` bytes (None: predict only). Raises InfeasibleBudget."""
    dev = dev or DeviceModel()
    base = predict(joint, num_fwd_outputs, static)
    p = Plan(budget, True, False, base, base, step_s=step_seconds(joint, dev), warnings=list(base.warnings))
    if budget is None or base.peak <= budget:
        p.feasible = budget is None or base.peak <= budget
        return p
    # bytes the budget leaves for activations kept across the gap
    other = base.peak - base.saved_bytes
    limit = budget - other
    best: tuple[dict[str, str], Timeline] | None = None
    for rnd in range(1, max_rounds + 1):
        p.rounds = rnd
        dec = solve(joint, num_fwd_outputs, max(limit, 0), dev) if limit > 0 else None
        if dec is None:
            break
        tl = _predict_tagged(joint, num_fwd_outputs, static, dec)
        if tl.peak <= budget:
            best = (dec, tl)
            break
        limit -= (tl.peak - budget) + 2**20
    if best is None:
        _, mtl = minimum_plan(joint, num_fwd_outputs, static, dev)
        bd, text = _breakdown(static, mtl)
        smallest = max(mtl.peak, base.peak if base.saved_bytes == 0 else 0)
        smallest = int(math.ceil(smallest / 2**10) * 2**10)  # whole KiB, so the suggestion itself fits
        raise InfeasibleBudget(
            f"memory_budget={format_bytes(budget)} is infeasible for this graph: {text}; "
            f"smallest feasible budget {format_bytes(smallest)}",
            smallest_feasible=smallest, breakdown=bd)
    dec, tl = best
    _tag(joint, dec)
    names = {n.name: n for n in joint.graph.nodes}
    p.decisions, p.timeline, p.modified = dec, tl, True
    p.overhead_s = sum(node_seconds(names[k], dev) for k, v in dec.items() if v == "recompute")
    p.warnings = sorted(set(p.warnings) | set(tl.warnings))
    return p
