"""Budget scheduler: per forward value choose save / recompute / offload so the step fits a
byte budget at the least estimated time, solved as a MILP (scipy.optimize.milp, HiGHS).

Variables, per forward compute node j: keep_j (saved on the device across the
forward/backward gap), rec_j (recomputed in backward), off_j (offloaded to pinned
host memory after its last forward use, copied back before its first backward
use), and one continuous E (exposed transfer seconds). Constraints:

* a value backward reads is kept, recomputed or offloaded: keep_j + rec_j + off_j >= 1
* recomputing j needs each forward input i of j:           keep_i + rec_i + off_i >= rec_j
  (parameters and graph inputs are always available)
* device bytes kept across the gap fit what the budget leaves: sum_j keep_j * bytes_j <= L
* E >= sum_j off_j * (d_j + max(0, h_j - W_j))   (the copy-out d_j = bytes_j / d2h runs on the
  compute stream; the copy-in h_j = bytes_j / h2d is hidden by the compute before its use)
* E >= sum_j off_j * t_j - T             (one host link: all copies within the step)

with t_j = bytes_j / d2h + bytes_j / h2d, W_j the estimated compute seconds between
j's last forward use and its first backward use (joint graph order), T the
estimated seconds of the whole step. Objective: minimize sum_j rec_j * seconds_j +
E + sum_j off_j * overhead (FLOPs at the device's rate, or bytes over memory
bandwidth for memory-bound ops). It is solved in two stages (:func:`_milp`): the LP
relaxation, then the integers over the variables it left fractional, accepted when
within 0.1% of the LP's bound, else the whole MILP. The solution is written as ``meta["recompute"] =
MUST_RECOMPUTE / MUST_SAVE`` tags (offloaded values are MUST_SAVE) plus
``ufx(node).decision``; the min-cut partitioner honours the tags and the
offload_activations / reload_activations passes move the offloaded values. The
plan is then checked by partitioning a copy, applying the same offload transform
and predicting its timeline (offloaded bytes are off the device between the
copy-out and the copy-in). If the prediction exceeds the budget, L is lowered by
the excess and the MILP is solved again (a few rounds).

Chunking is not chosen here: chunk decisions need the chunk_recompute pass to
materialize them, and are reported as unavailable.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import astuple, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.memory.model import (Static, Timeline, _Walker, forward_nodes, lce_options, partition, predict,
                                     round_block, simulate, storage_size)
from unsloth_fx.options import format_bytes
from unsloth_fx.pass_base import ufx


@dataclass(frozen=True)
class DeviceModel:
    """Rates the cost model uses (defaults: one H100 SXM, bf16 dense; PCIe 5 x16 host link
    at about 25 GB/s each way in practice). Units: FLOP/s, bytes/s, seconds."""

    flops_per_s: float = 400e12
    mem_bytes_per_s: float = 2.0e12
    h2d_bytes_per_s: float = 25e9  # host -> device (reload)
    d2h_bytes_per_s: float = 25e9  # device -> host (offload)
    offload_overhead_s: float = 5e-6  # per offloaded tensor: two copy launches and an event wait
    offload: bool = True  # False: the solver never offloads
    # charge the fused LM head + CE its matmuls (node_seconds). minimum_decisions turns it off: its time-optimal
    # candidates search for low peaks, and costed honestly they keep the op's [vocab, hidden] gradient, which the
    # kept-bytes limit counts as held across the gap although the forward's last op makes it (tiny models' floors
    # rose 10%; docs/memory.md, "Thirteenth session")
    lm_head_flops: bool = True


class InfeasibleBudget(ValueError):
    """The budget cannot hold the step even with every activation recomputed."""

    def __init__(self, message: str, *, smallest_feasible: int, breakdown: dict[str, int]):
        super().__init__(message)
        self.smallest_feasible = smallest_feasible
        self.breakdown = breakdown


@dataclass
class Plan:
    """What the scheduler decided. ``decisions``: joint node name -> "save" | "recompute" | "offload"."""

    budget: int | None
    feasible: bool
    modified: bool
    baseline: Timeline
    timeline: Timeline
    decisions: dict[str, str] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # region/node -> chunk count (for chunk_recompute)
    overhead_s: float = 0.0  # estimated extra seconds per step (recompute + exposed offload transfers)
    offloaded_bytes: int = 0  # device bytes moved to host between forward and backward
    offload_s: float = 0.0  # estimated exposed (not hidden by compute) transfer seconds
    device_model: DeviceModel | None = None
    step_s: float = 0.0  # estimated seconds of the step's compute
    step_flops: float = 0.0  # the joint graph's matmul + attention FLOPs (node_flops), before any recompute
    recompute_flops: float = 0.0  # the FLOPs the plan's recomputes add to a step
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
            "step_flops": self.step_flops, "recompute_flops": self.recompute_flops,
            "offloaded_bytes": self.offloaded_bytes, "offload_s": self.offload_s,
            "unavailable": self.unavailable, "warnings": self.warnings,
        }

    def flops_line(self) -> str:
        """What the recomputes add, as plan_memory's report and the CLI print it."""
        return (f"recompute adds {self.recompute_flops / 1e12:.3g} TFLOP of matmul and attention to the step's "
                f"{self.step_flops / 1e12:.3g} ({self.recompute_flops / max(self.step_flops, 1.0):.1%})")


UNAVAILABLE = {
    "chunk": "needs chunk_recompute to materialize chunk plans; never chosen",
}


def node_flops(node: torch.fx.Node, dev: DeviceModel) -> float:
    """The FLOPs :func:`node_seconds` charges ``node``: 2 x output x inner size for matmuls, 4 x queries x keys
    for attention (causal or not) and twice that for its backward (dQ, dK, dV and dP: four products of the
    forward's two), the fused LM head + CE's matmuls (``dev.lm_head_flops``); 0 for the rest."""
    val = node.meta.get("val")
    name = getattr(node.target, "__name__", str(node.target))
    shapes = [a.meta.get("val") for a in node.all_input_nodes]
    shapes = [s for s in shapes if isinstance(s, torch.Tensor)]
    out = val[0] if isinstance(val, (tuple, list)) and val else val
    if not (isinstance(out, torch.Tensor) and shapes):
        return 0.0
    if name.startswith(("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")):
        a = shapes[1] if name.startswith(("addmm", "baddbmm")) and len(shapes) > 1 else shapes[0]
        k = a.shape[-1] if a.dim() else 1
        return 2.0 * _hint(out.numel()) * _hint(k)
    if "attention" in name:
        backward = "backward" in name and len(shapes) > 2  # (grad_out, query, key, value, ...)
        q, kk = (shapes[1], shapes[2]) if backward else (shapes[0], shapes[1])
        return (8.0 if backward else 4.0) * _hint(q.numel()) * _hint(kk.shape[-2])
    if name.startswith("linear_cross_entropy") and len(shapes) >= 2 and dev.lm_head_flops:
        # the fused LM head + CE (runtime/linear_cross_entropy.py): logits h @ W.T, and with compute_grad
        # also g @ W and g.T @ h, each 2 * tokens * vocab * hidden. Without this it was costed at its bytes
        # (0.24 ms for the 1.5B at seq 2048, against ~2.9 TFLOP) and the plans recomputed it in backward.
        grad = lce_options(node)["compute_grad"]
        return (6.0 if grad else 2.0) * _hint(shapes[0].numel()) * _hint(shapes[1].shape[0])
    return 0.0


def node_seconds(node: torch.fx.Node, dev: DeviceModel) -> float:
    """Estimated seconds to run ``node`` once: max(FLOPs / rate, bytes moved / bandwidth). Views are charged
    their input and output bytes too, though they move nothing (docs/memory.md: making them free changed
    the minimum plans enough to break the layer extrapolation's 2% agreement; not adopted)."""
    val = node.meta.get("val")
    shapes = [a.meta.get("val") for a in node.all_input_nodes]
    shapes = [s for s in shapes if isinstance(s, torch.Tensor)]
    out = val[0] if isinstance(val, (tuple, list)) and val else val
    moved = sum(_hint(storage_size(s).nbytes) for s in shapes)
    if isinstance(out, torch.Tensor):
        moved += _hint(storage_size(out).nbytes)
    return max(node_flops(node, dev) / dev.flops_per_s, moved / dev.mem_bytes_per_s)


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
        # an offloaded value is saved (then moved to host by offload_activations)
        n.meta["recompute"] = policy.MUST_RECOMPUTE if d == "recompute" else policy.MUST_SAVE
        ufx(n).decision = d


def offload_windows(joint: torch.fx.GraphModule, num_fwd_outputs: int, dev: DeviceModel) -> dict[str, float]:
    """Offload candidates and their windows: per node of the joint graph's forward region
    (before its first tangent-dependent node) that a node of the backward region reads,
    the estimated compute seconds between its last forward-region use and its first
    backward-region use, the time a copy-out plus copy-in can hide behind."""
    fset = set(forward_nodes(joint, num_fwd_outputs))
    nodes = list(joint.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    bstart = next((i for i, n in enumerate(nodes) if n.op == "call_function" and n not in fset), len(nodes))
    prefix = [0.0]
    for n in nodes:
        prefix.append(prefix[-1] + (node_seconds(n, dev) if n.op == "call_function" else 0.0))
    out: dict[str, float] = {}
    for n in nodes[:bstart]:
        if n not in fset:
            continue
        bw = [pos[u] for u in n.users if pos[u] >= bstart and u.op != "output"]
        if not bw:
            continue
        a = max([pos[u] for u in n.users if pos[u] < bstart] + [pos[n]])
        out[n.name] = max(prefix[min(bw)] - prefix[a + 1], 0.0)
    return out


def transfer_seconds(nbytes: float, dev: DeviceModel) -> float:
    """Seconds to copy ``nbytes`` out to the host and back."""
    return nbytes / dev.d2h_bytes_per_s + nbytes / dev.h2d_bytes_per_s


def exposed_seconds(nbytes: float, window_s: float, dev: DeviceModel) -> float:
    """Transfer seconds of one offload not hidden behind ``window_s`` seconds of compute: the
    copy-out runs on the compute stream (never hidden; passes/offload_activations.py says why),
    the copy-in on a side stream ahead of its first use."""
    return nbytes / dev.d2h_bytes_per_s + max(nbytes / dev.h2d_bytes_per_s - window_s, 0.0)


MIP_REL_GAP = 1e-3  # solve()'s optimality gap: a plan within 0.1% of the least estimated time is accepted


# how the last _milp call ended: "fixed" (LP relaxation, then the integer problem over its fractional variables),
# "full" (the whole integer problem; fixed_fun: the fixed one's objective, None when it found nothing) or
# "lp-infeasible", with the objective and the LP bound (solve() adds "kept": the bytes its plan keeps); for tests
# and diagnostics
LAST_MILP: dict[str, Any] = {}


def _milp(c: np.ndarray, cons: Any, integrality: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> np.ndarray | None:
    """Minimize ``c @ x`` under ``cons`` and bounds, the variables where ``integrality`` is 1 integer.
    Returns x, or None when infeasible (or nothing found within the time limit).

    First the LP relaxation, then the integer problem with every variable the LP left integral fixed at its
    value: the planner's LPs are nearly integral (r1-distill-qwen-1.5b at 7 GiB: 7 fractional variables of
    30,472 in one round, 646 in the other), so that problem is small. Its plan is accepted when it is within
    MIP_REL_GAP of the LP's bound, which no integer plan can beat; so it carries the same guarantee as the
    whole MILP solved to that gap. Otherwise (or when fixing made it infeasible) the whole MILP is solved.
    On that model the two stages took 0.6-0.7 s a round where the whole MILP took 8-24 s (docs/memory.md)."""
    from scipy.optimize import Bounds, milp

    LAST_MILP.clear()
    lp = milp(c, constraints=[cons], bounds=Bounds(lb, ub), options={"time_limit": 60.0})
    if lp.status == 2:  # the relaxation is infeasible, so is the integer problem
        LAST_MILP.update(how="lp-infeasible")
        return None
    fixed = None
    if lp.x is not None:
        ints = integrality.astype(bool) & (np.abs(lp.x - np.round(lp.x)) <= 1e-6)
        flb, fub = lb.copy(), ub.copy()
        flb[ints] = fub[ints] = np.round(lp.x[ints])
        res = milp(c, constraints=[cons], integrality=integrality, bounds=Bounds(flb, fub),
                   options={"time_limit": 60.0, "mip_rel_gap": MIP_REL_GAP})
        if res.x is not None and res.fun - lp.fun <= max(MIP_REL_GAP * abs(lp.fun), 1e-9):
            LAST_MILP.update(how="fixed", fun=float(res.fun), bound=float(lp.fun), fractional=int((~ints
                             & integrality.astype(bool)).sum()))
            return res.x
        fixed = res if res.x is not None else None
    # mip_rel_gap 1e-3 (HiGHS' default 1e-4): the estimated seconds are far coarser than 0.1%, and on the 7B's
    # 26k-node graph the default gap ran into the 60 s limit where 1e-3 took 7.8 s for an objective 0.05% higher
    res = milp(c, constraints=[cons], integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": 60.0, "mip_rel_gap": MIP_REL_GAP})
    if fixed is not None and res.x is None:  # the whole MILP found nothing in its time: the fixed plan
        res = fixed
    LAST_MILP.update(how="full", fun=None if res.x is None else float(res.fun),
                     bound=None if lp.x is None else float(lp.fun), fixed_fun=None if fixed is None else
                     float(fixed.fun))
    return res.x


def solve(joint: torch.fx.GraphModule, num_fwd_outputs: int, limit: int, dev: DeviceModel,
          force_recompute: bool = False, force_offload: set[str] | None = None,
          pinned: set[str] | frozenset[str] = frozenset()) -> dict[str, str] | None:
    """One MILP: keep at most ``limit`` device bytes across the gap. Returns decisions
    (node name -> "save" | "recompute" | "offload") or None if infeasible.
    ``force_recompute``: minimize kept bytes instead of time (offloading is free then).
    ``force_offload``: node names that must be offloaded (when they can be).
    ``pinned``: node names that are never recomputed (saved or offloaded; :func:`layer_boundaries`)."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_matrix

    from unsloth_fx.passes.offload_activations import offloadable

    LAST_MILP.clear()  # no stale "kept" from an earlier solve when this one returns before its MILP
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
    can_off = np.zeros(m)
    exposed = np.zeros(m)
    transfer = np.zeros(m)
    windows = offload_windows(joint, num_fwd_outputs, dev) if dev.offload else {}
    for n in cand:
        i = idx[n]
        s = _compat.node_storage(n) if isinstance(n.meta.get("val"), torch.Tensor) else None
        base = storage_first.setdefault(s, n) if s is not None else n
        # a view costs its base's bytes when kept (it keeps the base alive)
        size[i] = round_block(storage_size(base.meta["val"]).nbytes)
        cost[i] = node_seconds(n, dev)
        if not _recomputable(n) or n.name in pinned:
            can_rec[i] = 0
        if n.name in windows and base is n and offloadable(n):
            can_off[i] = 1
            transfer[i] = transfer_seconds(size[i], dev)
            exposed[i] = exposed_seconds(size[i], windows[n.name], dev)
    # variables: keep[0:m], rec[m:2m], off[2m:3m], E (exposed transfer seconds) at 3m
    nv = 3 * m + 1
    rows: list[tuple[dict[int, float], float, float]] = []
    for n in cand:
        i = idx[n]
        if any(u not in fset and u.op != "output" for u in n.users):  # read by backward
            rows.append(({i: 1.0, m + i: 1.0, 2 * m + i: 1.0}, 1.0, np.inf))
        for a in n.all_input_nodes:
            if a in idx:  # recomputing n needs a (kept, recomputed or reloaded)
                j = idx[a]
                rows.append(({j: 1.0, m + j: 1.0, 2 * m + j: 1.0, m + i: -1.0}, 0.0, np.inf))
    rows.append(({i: size[i] for i in range(m)}, -np.inf, float(limit)))
    for n in cand:  # keeping a view of an offloaded value would keep its storage on the device
        b = storage_first.get(_compat.node_storage(n)) if isinstance(n.meta.get("val"), torch.Tensor) else None
        if b is not None and b is not n and b in idx and can_off[idx[b]]:
            rows.append(({idx[n]: 1.0, 2 * m + idx[b]: 1.0}, -np.inf, 1.0))
    if can_off.any():
        step = step_seconds(joint, dev)
        rows.append(({3 * m: 1.0, **{2 * m + i: -exposed[i] for i in range(m) if can_off[i]}}, 0.0, np.inf))
        rows.append(({3 * m: 1.0, **{2 * m + i: -transfer[i] for i in range(m) if can_off[i]}}, -step, np.inf))
    A = lil_matrix((len(rows), nv))
    lo, hi = np.zeros(len(rows)), np.zeros(len(rows))
    for r, (coef, l, h) in enumerate(rows):
        for k, v in coef.items():
            A[r, k] = v
        lo[r], hi[r] = l, h
    # objective: recompute seconds + exposed transfer seconds + a fixed cost per offload;
    # a tiny byte term prefers fewer kept bytes among equal-time plans
    c = np.concatenate([size * 1e-15, cost + 1e-12, size * 1e-15 + dev.offload_overhead_s, [1.0]])
    if force_recompute:
        c = np.concatenate([size, np.zeros(m), np.zeros(m), [0.0]])
    # a tuple is never saved itself (its getitems are)
    can_keep = np.array([1.0 if isinstance(n.meta.get("val"), torch.Tensor) else 0.0 for n in cand])
    lb = np.zeros(nv)
    if force_offload:
        for n in cand:
            if (n.name in force_offload or "all" in force_offload) and can_off[idx[n]]:
                lb[2 * m + idx[n]] = 1.0
    ub = np.concatenate([can_keep, can_rec, can_off, [np.inf]])
    integrality = np.concatenate([np.ones(3 * m), [0]])
    xs = _milp(c, LinearConstraint(A.tocsr(), lo, hi), integrality, lb, ub)
    if xs is None:  # infeasible (or no solution within the time limit)
        return None
    x = np.round(xs[:3 * m]).astype(int)
    LAST_MILP["kept"] = float(size @ x[:m])  # the bytes this plan keeps, as the limit row counts them
    out: dict[str, str] = {}
    for n in cand:
        i = idx[n]
        if x[m + i]:
            out[n.name] = "recompute"
        elif x[2 * m + i]:
            out[n.name] = "offload"
        elif x[i] and (size[i] > 0):
            out[n.name] = "save"
    return out


def _breakdown(static: Static, minimum: Timeline) -> tuple[dict[str, int], str]:
    acts = max(minimum.peak - static.resident - static.gradients, 0)
    bd = {"parameters": static.parameters + static.buffers, "gradients": static.gradients,
          "optimizer_state": static.optimizer_state, "inputs": static.inputs, "minimum_activations": acts}
    if static.workspace:
        bd["workspace"] = static.workspace
    if static.block_slack:
        bd["block_slack"] = static.block_slack
    total = sum(bd.values())
    ws = f"CUDA library workspaces {format_bytes(static.workspace)} + " if static.workspace else ""
    ws += f"allocator block slack {format_bytes(static.block_slack)} + " if static.block_slack else ""
    text = (f"parameters {format_bytes(bd['parameters'])} + gradients {format_bytes(bd['gradients'])} + "
            f"optimizer state {format_bytes(bd['optimizer_state'])} + inputs {format_bytes(bd['inputs'])} + "
            f"{ws}minimum activations {format_bytes(acts)} = {format_bytes(total)}")
    return bd, text


def minimum_plan(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static,
                 dev: DeviceModel) -> tuple[dict[str, str], Timeline]:
    """The lowest-peak plan among a few candidates, and its predicted timeline.

    Recomputing everything is not always the lowest peak: recomputed values are
    alive together in backward. Candidates: no tags (the partitioner's own choice),
    keep the fewest bytes, and the time-optimal MILP at 1/2 and 1/4 of the
    baseline's saved bytes, all without offload; with ``dev.offload``, also
    :func:`offload_minimum` (the fewest device bytes kept, offload free). Each is a
    plan :func:`plan` reaches: it falls back to no-offload plans, then to
    :func:`offload_minimum` itself."""
    base = predict_base(joint, num_fwd_outputs, static)
    best: tuple[dict[str, str], Timeline] = ({}, base)
    plain = replace(dev, offload=False)
    decs = minimum_decisions(joint, num_fwd_outputs, base.saved_bytes, dev)
    for dec, d in zip(decs, [plain] * (len(decs) - 1) + [dev]):
        if not dec:
            continue
        tl = _predict_tagged(joint, num_fwd_outputs, static, dec, d)
        if tl.peak < best[1].peak:
            best = (dec, tl)
    return best


def minimum_decisions(joint: torch.fx.GraphModule, num_fwd_outputs: int, saved_bytes: int,
                      dev: DeviceModel) -> list[dict[str, str] | None]:
    """The decisions :func:`minimum_plan` chooses among, in a fixed order: keep the fewest bytes; the
    time-optimal MILP at 1/2 and 1/4 of ``saved_bytes`` (the all-saved plan's saved bytes), all three
    without offload; last, :func:`offload_minimum` (None without ``dev.offload``). They depend on the
    graph, not on the optimizer, so a caller checking several optimizer policies solves once per graph."""
    plain = replace(dev, offload=False, lm_head_flops=False)
    decs = [solve(joint, num_fwd_outputs, 2**62, plain, force_recompute=True)]
    decs += [solve(joint, num_fwd_outputs, int(saved_bytes * f), plain) for f in (0.5, 0.25)]
    return decs + [offload_minimum(joint, num_fwd_outputs, dev)]


def offload_minimum(joint: torch.fx.GraphModule, num_fwd_outputs: int, dev: DeviceModel) -> dict[str, str] | None:
    """Decisions that keep the fewest bytes on the device across the forward-backward gap,
    offload allowed (and free: this ignores time), recompute for the rest: the lowest-memory
    plan with offload, for budgets the time-optimal rounds of :func:`plan` cannot reach.
    None without ``dev.offload`` or when the solve finds nothing."""
    if not dev.offload:
        return None
    return solve(joint, num_fwd_outputs, 2**62, dev, force_recompute=True)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _layer_of(n: torch.fx.Node) -> int | None:
    """The decoder layer index a node was traced in (``...layers.N...`` in its module stack), or None."""
    found = [int(m.group(1)) for path, *_ in (n.meta.get("nn_module_stack") or {}).values()
             for m in [_LAYER.search(str(path))] if m]
    return max(found) if found else None


def layer_boundaries(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """The residual stream between decoder layers: forward values made before layer N (in an earlier
    layer, or outside every layer, as the embedding) that layer N reads, and the last layer's output
    that the final norm reads, shaped like the embedding's output.

    Recomputing them chains every layer's recompute to the one before it: torch's partitioner
    recomputes each value once, for its first backward reader, so a chain started by the LM head's
    backward keeps every layer's recomputed values alive until that layer's backward (the 7B at
    24 GiB: 38.73 GiB predicted, docs/memory.md). Empty for graphs without ``layers.N`` modules."""
    fwd = forward_nodes(joint, num_fwd_outputs)
    emb = next((n for n in fwd if n.target is torch.ops.aten.embedding.default), None)
    if emb is None or not isinstance(emb.meta.get("val"), torch.Tensor):
        return set()
    shape = tuple(emb.meta["val"].shape)
    layers = {n: _layer_of(n) for n in fwd}
    pos = {n: i for i, n in enumerate(fwd)}
    first = next((i for i, n in enumerate(fwd) if layers[n] is not None), len(fwd))
    last = max((i for i, n in enumerate(fwd) if layers[n] is not None), default=len(fwd))
    out: set[str] = set()
    for n in fwd:
        layer = layers[n]
        if layer is None:
            continue
        if (isinstance(n.meta.get("val"), torch.Tensor) and tuple(n.meta["val"].shape) == shape and n.users
                and all(u in pos and layers[u] is None and pos[u] > last for u in n.users)):
            out.add(n.name)  # read only after every layer: the last layer's output, read by the final norm
        for a in n.all_input_nodes:
            before = layers.get(a)
            # made in an earlier layer, or outside the layers before the first one (the embedding); a value
            # without a layer made later (a chunking pass's concatenation inside a layer) is not a boundary
            if (a in pos and a.op != "placeholder" and (before < layer if before is not None else pos[a] < first)
                    and isinstance(a.meta.get("val"), torch.Tensor) and tuple(a.meta["val"].shape) == shape):
                out.add(a.name)
    return out


class _OffloadWalker(_Walker):
    """The model's walker, told which values live on the host: the forward's host copies
    (offload_activation outputs) allocate no device bytes; an offloaded value is
    labelled "saved" on the device until its last forward use and again from its reload."""

    def __init__(self, static: Static, recomputable: set[str], offloaded: set[str]):
        super().__init__(static, recomputable)
        self.offloaded = offloaded
        self.host: set[Any] = set()

    def alloc(self, phase: str, n: torch.fx.Node, s: Any, cat: str) -> None:
        from unsloth_fx.passes.offload_activations import OFFLOAD, RELOAD

        if n.target is OFFLOAD:
            self.host.add(s)
            self.bytes[s], self.cat[s] = 0, cat
            return
        if n.target is RELOAD or n.name in self.offloaded:
            cat = "saved"
        super().alloc(phase, n, s, cat)

    def free(self, phase: str, node: Any, s: Any) -> None:
        if s in self.host:
            self.bytes.pop(s, None)
            self.cat.pop(s, None)
            return
        super().free(phase, node, s)


def predict_planned(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static,
                    dev: DeviceModel | None = None) -> tuple[Timeline, dict[str, str]]:
    """Predict the timeline of ``joint`` as it will run: partitioned (tags honoured), then
    the values tagged ``decision="offload"`` moved to host by the same transforms the
    offload_activations / reload_activations passes apply. Returns the timeline and
    {saved name: host node name} of what was really offloaded."""
    graphs = _planned_graphs(joint, num_fwd_outputs, dev)
    return _walk_planned(joint, num_fwd_outputs, static, *graphs), graphs[2]


def _planned_graphs(joint: torch.fx.GraphModule, num_fwd_outputs: int,
                    dev: DeviceModel | None) -> tuple[Any, Any, dict[str, str], bool]:
    """:func:`predict_planned`'s graphs: (forward, backward, offloaded {saved: host node}, whether any
    value was tagged for offload)."""
    from unsloth_fx.passes.offload_activations import offload_forward, reload_backward

    wanted = any(n.meta.get("ufx") is not None and n.meta["ufx"].decision == "offload" for n in joint.graph.nodes)
    fw, bw = partition(joint, num_fwd_outputs)
    if not wanted:
        return fw, bw, {}, False
    done = offload_forward(fw, num_fwd_outputs)
    reload_backward(bw, done, dev)
    return fw, bw, done, True


def _walk_planned(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static, fw: Any, bw: Any,
                  done: dict[str, str], wanted: bool) -> Timeline:
    rec = {n.name for n in forward_nodes(joint, num_fwd_outputs)}
    if not wanted:
        return simulate(fw, bw, num_fwd_outputs, static, recomputable=rec)
    return _OffloadWalker(static, rec, set(done)).run(fw, bw, num_fwd_outputs, False)


# the partitioned graphs of earlier predictions, while partition_cache() is active:
# {key: (fw, bw, offloaded, any offload tagged, the joint graph, held so that its id stays unique)}
_PARTITIONS: dict[tuple, tuple] | None = None


@contextlib.contextmanager
def partition_cache(store: dict | None = None) -> Iterator[None]:
    """Inside, a prediction of the same joint graph with the same decisions (and device rates)
    reuses the partitioned and offload-transformed graphs of the first one and only walks them
    again with its own :class:`Static`. The tier ladder predicts one trace's minimum-plan
    candidates once per optimizer policy: the graphs are the same, only the static bytes differ.
    ``store``: the dict to keep them in (to share them between scopes), else a new one, or the
    enclosing scope's. The joint graphs must not change while it holds them."""
    global _PARTITIONS
    outer = _PARTITIONS
    _PARTITIONS = store if store is not None else {} if outer is None else outer
    try:
        yield
    finally:
        _PARTITIONS = outer


def predict_base(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static) -> Timeline:
    """``predict`` (the joint graph's own tags, no decisions of ours), through :func:`partition_cache`
    when it is active."""
    if _PARTITIONS is None:
        return predict(joint, num_fwd_outputs, static)
    key = (id(joint.graph), num_fwd_outputs, "base")
    if key not in _PARTITIONS:
        _PARTITIONS[key] = (*partition(joint, num_fwd_outputs), {}, False, joint)  # the joint keeps its id unique
    fw, bw, done, wanted, _ = _PARTITIONS[key]
    return _walk_planned(joint, num_fwd_outputs, static, fw, bw, done, wanted)


def _predict_tagged(joint, num_fwd_outputs, static, decisions, dev=None) -> Timeline:
    return _predict_tagged_offload(joint, num_fwd_outputs, static, decisions, dev)[0]


def _predict_tagged_offload(joint, num_fwd_outputs, static, decisions, dev=None) -> tuple[Timeline, dict[str, str]]:
    if _PARTITIONS is None:
        graphs = _tagged_graphs(joint, num_fwd_outputs, decisions, dev)
    else:
        key = (id(joint.graph), num_fwd_outputs, frozenset(decisions.items()), None if dev is None else astuple(dev))
        if key not in _PARTITIONS:
            _PARTITIONS[key] = (*_tagged_graphs(joint, num_fwd_outputs, decisions, dev), joint)
        graphs = _PARTITIONS[key][:4]
    return _walk_planned(joint, num_fwd_outputs, static, *graphs), graphs[2]


def _tagged_graphs(joint, num_fwd_outputs, decisions, dev=None) -> tuple[Any, Any, dict[str, str], bool]:
    """:func:`_planned_graphs` of ``joint`` tagged with ``decisions``; the joint graph's tags are restored."""
    saved_meta = {n.name: (n.meta.get("recompute"), n.meta.get("ufx")) for n in joint.graph.nodes}
    with _compat.lazy_graph_modules():
        g = _compat.graph_module(joint, joint.graph)  # same graph: tag, partition, untag
    try:
        _tag(g, decisions)
        return _planned_graphs(g, num_fwd_outputs, dev)
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


def step_flops(joint: torch.fx.GraphModule, dev: DeviceModel) -> float:
    """The matmul and attention FLOPs of the whole joint graph (forward + backward), by :func:`node_flops`."""
    return sum(node_flops(n, dev) for n in joint.graph.nodes if n.op == "call_function")


LAYER_CHECKPOINTS = ("fallback", "first", "off")


def plan(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static, budget: int | None,
         dev: DeviceModel | None = None, max_rounds: int = 6, force_offload: set[str] | None = None,
         layer_checkpoints: str = "fallback") -> Plan:
    """Plan ``joint`` to ``budget`` bytes (None: predict only). Raises InfeasibleBudget.

    ``max_rounds``: time-optimal MILP rounds tried in each stage (with offload, then without, then
    with the layer boundaries pinned) before the fewest device bytes; 0 goes straight to that last plan.
    ``layer_checkpoints``: when to try rounds that never recompute :func:`layer_boundaries` (classic
    per-layer checkpoints, each kept on the device or offloaded): ``"fallback"`` after the unpinned
    rounds miss, ``"first"`` before them, ``"off"`` never.
    ``force_offload``: forward node names (or {"all"}) to offload whatever the cost
    (a test and debugging hook; names that cannot be offloaded are ignored)."""
    if layer_checkpoints not in LAYER_CHECKPOINTS:
        raise ValueError(f"layer_checkpoints={layer_checkpoints!r}: expected one of {', '.join(LAYER_CHECKPOINTS)}")
    dev = dev or DeviceModel()
    base = predict_base(joint, num_fwd_outputs, static)
    p = Plan(budget, True, False, base, base, step_s=step_seconds(joint, dev), step_flops=step_flops(joint, dev),
             warnings=list(base.warnings),
             device_model=dev)
    if force_offload and (budget is None or base.peak <= budget):
        dec = {k: v for k, v in (solve(joint, num_fwd_outputs, 2**62, dev, force_offload=force_offload) or {}).items()
               if v == "offload"}
        if dec:
            tl, done = _predict_tagged_offload(joint, num_fwd_outputs, static, dec, dev)
            return _finish(p, joint, dec, tl, done, dev, num_fwd_outputs)
    if budget is None or base.peak <= budget:
        p.feasible = budget is None or base.peak <= budget
        return p
    pins = layer_boundaries(joint, num_fwd_outputs) if layer_checkpoints != "off" and not force_offload else set()
    pinned_note = (f"layer boundaries (the residual stream, {len(pins)} values) saved or offloaded, never recomputed: "
                   "the time-optimal rounds " + ("with them pinned came first (layer_checkpoints=first)"
                                                  if layer_checkpoints == "first" else "without that did not fit"))
    if pins and layer_checkpoints == "first":
        best, _ = _rounds(joint, num_fwd_outputs, static, budget, base, dev, max_rounds, None, p, pinned=pins)
        if best is not None:
            p.warnings.append(pinned_note)
            return _finish(p, joint, *best, dev, num_fwd_outputs)
    best, offloaded = _rounds(joint, num_fwd_outputs, static, budget, base, dev, max_rounds, force_offload, p)
    if best is None and dev.offload and not force_offload and offloaded is not False:
        # the time-optimal plans with offload did not fit: plan as without it before giving up. (When no
        # round offloaded anything, its optima were also the optima without offload: the same rounds.)
        plain = replace(dev, offload=False)
        best, _ = _rounds(joint, num_fwd_outputs, static, budget, base, plain, max_rounds, None, p)
        if best is not None:
            p.device_model = dev = plain
    if best is None and pins and layer_checkpoints == "fallback":
        # the time-optimal rounds recomputed the residual stream and chained every layer's recompute
        # together in backward; with it kept (saved or offloaded) each layer recomputes alone
        best, _ = _rounds(joint, num_fwd_outputs, static, budget, base, dev, max_rounds, None, p, pinned=pins)
        if best is not None:
            p.warnings.append(pinned_note)
    if best is None and dev.offload and not force_offload:
        # last: the fewest device bytes with offload, whatever the transfers cost (slower, but it
        # is the only plan that fits; minimum_plan counts it, so the floor it reports is reachable)
        dec = offload_minimum(joint, num_fwd_outputs, dev)
        if dec:
            tl, done = _predict_tagged_offload(joint, num_fwd_outputs, static, dec, dev)
            if tl.peak <= budget:
                best = (dec, tl, done)
                p.warnings.append("planned with the fewest device bytes (offload wherever it can, recompute the "
                                  "rest): " + ("the time-optimal plans did not fit the budget" if max_rounds else
                                               "asked for with max_rounds=0 (no time-optimal round tried)"))
    if best is None:
        mdec, mtl = minimum_plan(joint, num_fwd_outputs, static, dev)
        if mdec and mtl.peak <= budget:
            # the rounds missed, but a candidate of the refusal's own minimum fits: plan with it rather than
            # refuse a budget the refusal would call feasible (a 4-op chain at 17.75 KiB, 17.00 KiB its minimum)
            d = dev if "offload" in mdec.values() else replace(dev, offload=False)
            tl, done = _predict_tagged_offload(joint, num_fwd_outputs, static, mdec, d)
            p.warnings.append("planned with the lowest-peak candidate (the time-optimal rounds did not fit the "
                              "budget)")
            return _finish(p, joint, mdec, tl, done, dev, num_fwd_outputs)
        bd, text = _breakdown(static, mtl)
        smallest = max(mtl.peak, base.peak if base.saved_bytes == 0 else 0)
        smallest = int(math.ceil(smallest / 2**10) * 2**10)  # whole KiB, so the suggestion itself fits
        raise InfeasibleBudget(
            f"memory_budget={format_bytes(budget)} is infeasible for this graph: {text}; "
            f"smallest feasible budget {format_bytes(smallest)}",
            smallest_feasible=smallest, breakdown=bd)
    return _finish(p, joint, *best, dev, num_fwd_outputs)


def _rounds(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static, budget: int, base: Timeline,
            dev: DeviceModel, max_rounds: int, force_offload: set[str] | None,
            p: Plan, pinned: set[str] | frozenset[str] = frozenset()
            ) -> tuple[tuple[dict[str, str], Timeline, dict[str, str]] | None, bool | None]:
    """The time-optimal MILP at the bytes the budget leaves for kept activations, lowered by the
    predicted excess and solved again, up to ``max_rounds`` times. Returns ((decisions, timeline,
    offloaded) of the first plan predicted to fit, or None; whether any round's plan offloaded, None when
    no round found a plan).
    ``p.rounds`` counts the rounds."""
    limit = budget - (base.peak - base.saved_bytes)  # bytes the budget leaves for activations kept across the gap
    offloaded = None  # None: no round found a plan (a solve can also fail by its time limit)
    for rnd in range(1, max_rounds + 1):
        p.rounds = rnd
        dec = solve(joint, num_fwd_outputs, max(limit, 0), dev, force_offload=force_offload,
                    pinned=pinned) if limit > 0 else None
        if dec is None:
            break
        offloaded = bool(offloaded) or "offload" in dec.values()
        kept = LAST_MILP.get("kept", limit)
        tl, done = _predict_tagged_offload(joint, num_fwd_outputs, static, dec, dev)
        if tl.peak <= budget:
            return (dec, tl, done), offloaded
        # lower from what the plan kept, not from the limit: a plan 165 KB over that kept 2 MiB under its limit
        # came back unchanged from a limit lowered by the excess + 1 MiB (1.5B at 7 GiB: two rounds lost)
        limit = int(min(limit, kept)) - (tl.peak - budget) - 2**20
    return None, offloaded


def _finish(p: Plan, joint: torch.fx.GraphModule, dec: dict[str, str], tl: Timeline, done: dict[str, str],
            dev: DeviceModel, num_fwd_outputs: int) -> Plan:
    # an "offload" the transform could not carry out (the partitioner did not save the value,
    # or it is also a user output) is a plain save
    dec = {k: ("save" if v == "offload" and k not in done else v) for k, v in dec.items()}
    _tag(joint, dec)
    names = {n.name: n for n in joint.graph.nodes}
    windows = offload_windows(joint, num_fwd_outputs, dev) if done else {}
    p.decisions, p.timeline, p.modified = dec, tl, True
    nbytes = {k: round_block(storage_size(names[k].meta["val"]).nbytes) for k in done}
    exposed = max(sum(exposed_seconds(b, windows.get(k, 0.0), dev) for k, b in nbytes.items()),
                  sum(transfer_seconds(b, dev) for b in nbytes.values()) - p.step_s)  # E, as in solve
    p.offload_s = max(exposed, 0.0) + dev.offload_overhead_s * len(done)
    p.offloaded_bytes = sum(nbytes.values())
    p.overhead_s = sum(node_seconds(names[k], dev) for k, v in dec.items() if v == "recompute") + p.offload_s
    p.recompute_flops = sum(node_flops(names[k], dev) for k, v in dec.items() if v == "recompute")
    p.warnings = sorted(set(p.warnings) | set(tl.warnings))
    return p
