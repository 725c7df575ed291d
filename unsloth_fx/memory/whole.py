"""Whole-model memory estimates for the CLI: trace a zoo model on fake tensors and plan it.

Large models are not traced whole. Activation memory (everything above the
resident parameters, buffers, optimizer state and inputs, at the step's peak
outside the optimizer) is linear in the number of decoder layers of each kind,
so we trace small variants of the same config and extrapolate:

* dense models: 1 layer (A) and 2 layers (B): act(L) = act(A) + (L - 1) * (act(B) - act(A));
* DeepSeek-V3 MoE models (first k layers dense): A = 1 dense + 1 MoE, B = 1 dense + 2 MoE,
  C = 2 dense + 1 MoE: act = act(A) + (k - 1) * (C - A) + (L - k - 1) * (B - A).

Static bytes (parameters, gradients, optimizer state) come from the full
model built on meta, exactly. ``full=True`` traces every layer instead.
tests/test_memory.py checks the extrapolation against a full trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unsloth_fx.memory import model as M
from unsloth_fx.memory import schedule as S
from unsloth_fx.memory.trace import trace_model
from unsloth_fx.options import format_bytes


@dataclass
class Variant:
    counts: tuple[int, int]  # (dense layers, MoE layers)
    static: M.Static
    base: M.Timeline
    minimum: M.Timeline
    joint: Any
    nfwd: int

    def act(self, tl: M.Timeline) -> int:
        """Peak bytes outside the optimizer step above the resident bytes (gradients in flight included)."""
        return _noopt_peak(tl) - self.static.resident

    def act_only(self, tl: M.Timeline) -> int:
        """The same peak without the gradients alive at that moment: activations and temporaries."""
        return _noopt_peak(tl, without_grads=True) - self.static.resident


def _noopt_peak(tl: M.Timeline, without_grads: bool = False) -> int:
    best, grads = tl.static.resident, 0
    for e in tl.events:
        if e.category == "gradients":
            grads += e.bytes if e.kind == "alloc" else -e.bytes
        if e.phase != "optimizer":
            best = max(best, e.live_bytes - (grads if without_grads else 0))
    return best


@dataclass
class Estimate:
    name: str
    batch: int
    seq: int
    static: M.Static
    base_peak: int
    min_peak: int
    optimizer_peak: int
    traced: list[tuple[int, int]]
    extrapolated: bool
    timeline: M.Timeline  # of the largest traced variant (or the whole model)
    plan: S.Plan | None = None
    scale: float = 1.0  # layers in the model / layers traced
    warnings: list[str] = field(default_factory=list)
    activations: int = 0  # peak activations + temporaries without gradients (extrapolated)
    min_activations: int = 0

    @property
    def feasible_min(self) -> int:
        """Smallest budget this estimate can plan to (bytes)."""
        return max(self.min_peak, self.optimizer_peak)


def _layers(config: Any) -> tuple[int, int]:
    L = int(config.num_hidden_layers)
    k = getattr(config, "first_k_dense_replace", None)
    if getattr(config, "n_routed_experts", None) and k is not None:
        return min(int(k), L), L - min(int(k), L)
    return L, 0


def _variant(name: str, counts: tuple[int, int], batch: int, seq: int, dtype, optimizer: str, fuse: bool,
             dev: S.DeviceModel, progress) -> Variant:
    from unsloth_fx.zoo import build_model

    dense, moe = counts
    kw: dict[str, Any] = {"num_hidden_layers": dense + moe}
    if moe:
        kw["first_k_dense_replace"] = dense
    m = build_model(name, device="meta", **kw)
    tr = trace_model(m, batch, seq, dtype)
    st = M.static_breakdown([(r[1], r[2], r[3], r[4]) for r in tr.params], optimizer, fuse)
    st.inputs = M.inputs_bytes(tr.joint)
    base = M.predict(tr.joint, tr.num_fwd_outputs, st)
    _, mn = S.minimum_plan(tr.joint, tr.num_fwd_outputs, st, dev)
    if progress:
        progress(f"  traced {dense} dense + {moe} MoE layer(s) at seq {seq}: {len(tr.joint.graph.nodes)} nodes, "
                 f"{tr.seconds:.1f} s; activation peak {format_bytes(_noopt_peak(base) - st.resident)}")
    return Variant(counts, st, base, mn, tr.joint, tr.num_fwd_outputs)


def full_static(name: str, dtype, optimizer: str, fuse: bool, batch: int, seq: int) -> tuple[M.Static, Any]:
    from unsloth_fx.zoo import build_model

    m = build_model(name, device="meta")
    rows = []
    for p in m.parameters():
        rows.append((p.numel(), dtype if p.is_floating_point() else p.dtype, True, False))
    for b in m.buffers():
        rows.append((b.numel(), b.dtype, False, True))
    st = M.static_breakdown(rows, optimizer, fuse)
    st.inputs = 2 * M.round_block(batch * seq * 8)  # input_ids + labels (int64)
    return st, m.config


def estimate(name: str, *, batch: int = 1, seq: int = 2048, dtype=torch.bfloat16, optimizer: str = "adamw",
             fuse_optimizer: bool = False, budget: int | None = None, full: bool = False,
             dev: S.DeviceModel | None = None, progress: Callable[[str], None] | None = None) -> Estimate:
    """Predict (and, with ``budget``, plan) one training step of zoo model ``name``."""
    dev = dev or S.DeviceModel()
    st, config = full_static(name, dtype, optimizer, fuse_optimizer, batch, seq)
    n_dense, n_moe = _layers(config)
    L = n_dense + n_moe
    opt_peak = st.resident + st.gradients + st.optimizer_temp
    if full or L <= 3:
        v = _variant(name, (n_dense, n_moe), batch, seq, dtype, optimizer, fuse_optimizer, dev, progress) \
            if n_moe else _variant_dense(name, L, batch, seq, dtype, optimizer, fuse_optimizer, dev, progress)
        act_base, act_min, last, extrap, traced = v.act(v.base), v.act(v.minimum), v, False, [v.counts]
        acts = (v.act_only(v.base), v.act_only(v.minimum))
    else:
        if n_moe:
            A = _variant(name, (1, 1), batch, seq, dtype, optimizer, fuse_optimizer, dev, progress)
            B = _variant(name, (1, 2), batch, seq, dtype, optimizer, fuse_optimizer, dev, progress)
            C = _variant(name, (2, 1), batch, seq, dtype, optimizer, fuse_optimizer, dev, progress) if n_dense > 1 else A

            def ext(f):
                return f(A) + (n_dense - 1) * (f(C) - f(A)) + (n_moe - 1) * (f(B) - f(A))
            traced = [A.counts, B.counts] + ([C.counts] if C is not A else [])
        else:
            A = _variant_dense(name, 1, batch, seq, dtype, optimizer, fuse_optimizer, dev, progress)
            B = _variant_dense(name, 2, batch, seq, dtype, optimizer, fuse_optimizer, dev, progress)

            def ext(f):
                return f(A) + (L - 1) * (f(B) - f(A))
            traced = [A.counts, B.counts]
        act_base = ext(lambda v: v.act(v.base))
        act_min = ext(lambda v: v.act(v.minimum))
        acts = (ext(lambda v: v.act_only(v.base)), ext(lambda v: v.act_only(v.minimum)))
        last, extrap = B, True
    base_peak = max(st.resident + act_base, opt_peak)
    min_peak = max(st.resident + min(act_min, act_base), opt_peak)
    traced_layers = sum(last.counts)
    est = Estimate(name, batch, seq, st, base_peak, min_peak, opt_peak, traced, extrap, last.base,
                   scale=L / max(traced_layers, 1), activations=acts[0], min_activations=min(acts))
    if budget is not None and base_peak > budget and min_peak <= budget:
        # plan the traced graph to the same fraction of its reducible activations
        frac = (budget - min_peak) / max(base_peak - min_peak, 1)
        v_min, v_base = last.static.resident + last.act(last.minimum), last.static.resident + last.act(last.base)
        b_var = max(int(v_min + frac * (v_base - v_min)), M.round_block(1))
        try:
            est.plan = S.plan(last.joint, last.nfwd, last.static, max(b_var, _opt(last.static)), dev)
        except S.InfeasibleBudget as e:
            est.warnings.append(f"planning the traced variant failed: {e}")
        if est.plan is not None:
            est.timeline = est.plan.timeline
    return est


def _opt(st: M.Static) -> int:
    return st.resident + st.gradients + st.optimizer_temp


def _variant_dense(name, L, batch, seq, dtype, optimizer, fuse, dev, progress) -> Variant:
    from unsloth_fx.zoo import build_model

    m = build_model(name, device="meta", num_hidden_layers=L)
    tr = trace_model(m, batch, seq, dtype)
    st = M.static_breakdown([(r[1], r[2], r[3], r[4]) for r in tr.params], optimizer, fuse)
    st.inputs = M.inputs_bytes(tr.joint)
    base = M.predict(tr.joint, tr.num_fwd_outputs, st)
    _, mn = S.minimum_plan(tr.joint, tr.num_fwd_outputs, st, dev)
    if progress:
        progress(f"  traced {L} layer(s) at seq {seq}: {len(tr.joint.graph.nodes)} nodes, {tr.seconds:.1f} s; "
                 f"activation peak {format_bytes(_noopt_peak(base) - st.resident)}")
    return Variant((L, 0), st, base, mn, tr.joint, tr.num_fwd_outputs)


def largest_seq(name: str, budget: int, *, batch: int = 1, dtype=torch.bfloat16, optimizer: str = "adamw",
                fuse_optimizer: bool = False, start: int = 2048, granularity: int = 256, max_evals: int = 7,
                progress: Callable[[str], None] | None = None) -> int | None:
    """Largest sequence length (multiple of ``granularity``) whose minimum plan fits ``budget``,
    by bisection over concrete sequence lengths (each step re-traces the small variants).
    None: not even ``granularity`` tokens fit."""
    st, config = full_static(name, dtype, optimizer, fuse_optimizer, batch, granularity)
    if max(st.resident, _opt(st)) > budget:
        return None
    limit = int(getattr(config, "max_position_embeddings", 1 << 17))
    fits: dict[int, bool] = {}

    def ok(s: int) -> bool:
        if s not in fits:
            e = estimate(name, batch=batch, seq=s, dtype=dtype, optimizer=optimizer, fuse_optimizer=fuse_optimizer)
            fits[s] = e.feasible_min <= budget
            if progress:
                progress(f"  seq {s}: smallest budget {format_bytes(e.feasible_min)} -> {'fits' if fits[s] else 'does not fit'}")
        return fits[s]

    lo, hi = 0, None
    s = max(granularity, (start // granularity) * granularity)
    evals = 0
    while hi is None and evals < max_evals:  # grow until it does not fit
        evals += 1
        if ok(s):
            lo = s
            if s >= limit:
                return s
            s = min(s * 2, limit)
        else:
            hi = s
    if hi is None:
        return lo
    while hi - lo > granularity and evals < max_evals + 4:
        evals += 1
        mid = ((lo + hi) // 2 // granularity) * granularity
        if mid <= lo:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo or None


def time_it(fn, *a, **k):  # pragma: no cover - small helper for the CLI
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t
