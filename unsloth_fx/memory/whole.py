"""Whole-model memory estimates for the CLI: trace a zoo model on fake tensors and plan it.

Large models are not traced whole. Activation memory (everything above the
resident parameters, buffers, optimizer state and inputs, at the step's peak
outside the optimizer) is linear in the number of decoder layers of each kind,
so we trace small variants of the same config and extrapolate:

* dense models: 1 layer (A) and 2 layers (B): act(L) = act(A) + (L - 1) * (act(B) - act(A));
* DeepSeek-V3 MoE models (first k layers dense): A = 1 dense + 1 MoE, B = 1 dense + 2 MoE,
  C = 2 dense + 1 MoE: act = act(A) + (k - 1) * (C - A) + (L - k - 1) * (B - A).

Static bytes (parameters, gradients, optimizer state) come from the full
model built on meta, exactly (HybridAdamW's state per parameter, by its own tier
policy). ``full=True`` traces every layer instead. tests/test_memory.py checks
the extrapolation against a full trace.

What is traced (:func:`trace_step`): with ``chunks`` (the default, as
``apply_optimizations`` compiles), the model patched by ``patch_causal_lm`` and
compiled through the unsloth backend itself (Dynamo, on meta tensors) with the
chunking passes apply_optimizations adds (:func:`chunk_passes`: the chunked LM
head + cross-entropy op and token-chunked MLPs) and ``chunk_recompute``; the joint
graph those passes produce is what gets planned, so the activation floor credits
the chunking exactly as the compile will run it. Without ``chunks``, or for models
Dynamo cannot capture as one graph (MoE expert loops), the plain AOTAutograd
trace of ``model(input_ids, labels=input_ids).loss`` (unsloth_fx.memory.trace), and
the estimate says chunking was not credited.

``lower`` (the backend's lowering; the CLI models ``"inductor"``, the backend's default) is traced
as the backend traces it: with ``"inductor"`` the joint graph gets Inductor's decompositions and
the timeline uses ``inductor_inlined`` (``Static.lower``), as ``plan_memory`` does; the compiled trace then partitions with the plain
min-cut partitioner and lowers eagerly (meta tensors; only the joint graph is planned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unsloth_fx import _compat
from unsloth_fx.memory import allocator as A
from unsloth_fx.memory import model as M
from unsloth_fx.memory import schedule as S
from unsloth_fx.memory.trace import trace_model
from unsloth_fx.options import format_bytes


def chunk_passes(chunks: int, mlp: bool = True) -> list[str]:
    """The pre_grad chunking passes ``apply_optimizations`` adds to the pipeline (one list, so
    the planner's trace and the compile cannot drift apart). ``mlp=False``: the LM head + CE only."""
    lm = f"fuse_linear_cross_entropy{{chunks={chunks}}}"
    return [f"split_token_chunks{{chunks={chunks}}}", lm] if mlp else [lm]


def _is_moe(config: Any) -> bool:
    return any(getattr(config, k, None) for k in ("n_routed_experts", "num_experts", "num_local_experts"))


@dataclass
class Traced:
    """One traced training step: the joint graph, its parameters and what the trace credits."""

    joint: Any
    nfwd: int
    params: dict[int, Any] | None  # placeholder index -> ParamInfo (compiled trace), else None
    rows: list[tuple]  # static_breakdown rows (with names and shapes)
    nodes: int
    seconds: float
    chunking: dict[str, int] = field(default_factory=dict)  # region kind -> chunks actually applied
    notes: list[str] = field(default_factory=list)


def _rows_of(model: torch.nn.Module, dtype: torch.dtype | None) -> list[tuple]:
    rows = []
    for n, p in model.named_parameters():
        dt = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
        rows.append((p.numel(), dt, bool(p.requires_grad), False, n, tuple(p.shape)))
    for n, b in model.named_buffers():
        rows.append((b.numel(), b.dtype, False, True, n, tuple(b.shape)))
    return rows


def _set_lower(st: M.Static, lower: str) -> M.Static:
    """Record ``lower`` in ``st`` as ``static_from_graph`` (plan_memory) does."""
    st.lower = lower
    if lower == "inductor":
        st.assumptions.append("lower=inductor: pointwise chains Inductor fuses into their consumers are not "
                              "materialized (inductor_inlined); other buffer reuse is not credited")
    return st


@contextlib.contextmanager
def _eager_codegen():
    """Let the backend trace as its ``lower`` says (decompositions) but partition with the plain
    min-cut partitioner (Inductor's joint-graph passes rewrite the joint graph in place, and
    plan_memory sees it before them) and lower eagerly (meta tensors)."""
    import unsloth_fx.backend as backend

    real, part = backend._lower, backend._compat.inductor_partition
    backend._lower = lambda opts, gm, inputs, **kw: real(dataclasses.replace(opts, lower="eager"), gm, inputs)
    backend._compat.inductor_partition = backend._compat.min_cut_partition
    try:
        yield
    finally:
        backend._lower, backend._compat.inductor_partition = real, part


def trace_step(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype | None = torch.bfloat16,
               chunks: int | None = 8, lower: str = "eager", mlp: bool = True) -> Traced:
    """Trace one training step of causal LM ``model`` (on meta; it is modified: cast to
    ``dtype``, patched) as the compile will run it. See the module docstring. ``mlp=False``:
    with ``chunks``, only the LM head + CE is chunked."""
    rows = _rows_of(model, dtype)
    notes: list[str] = []
    if chunks and not _is_moe(getattr(model, "config", None)):
        try:
            return _trace_compiled(model, batch, seq, dtype, chunks, rows, lower, mlp)
        except Exception as e:  # a model Dynamo cannot capture whole: plan it unchunked, and say so
            notes.append(f"chunking not credited: the compiled trace failed ({type(e).__name__}: {str(e)[:160]})")
    elif chunks:
        notes.append("chunking not credited: MoE model (expert loops do not compile to one graph; "
                     "split_token_chunks does not match MoE experts)")
    # lower="inductor": trace with Inductor's decompositions, the table the backend traces with
    decomp = _compat.inductor_decompositions() if lower == "inductor" else None
    tr = trace_model(model, batch, seq, dtype, decompositions=decomp)
    return Traced(tr.joint, tr.num_fwd_outputs, None, rows, len(tr.joint.graph.nodes), tr.seconds, {}, notes)


def _trace_compiled(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype | None, chunks: int,
                    rows: list[tuple], lower: str = "eager", mlp: bool = True) -> Traced:
    import unsloth_fx.backend as backend
    from unsloth_fx.memory.trace import cuda_like_tracing
    from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

    t0 = time.perf_counter()
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    model.train()
    patch_causal_lm(model)
    dev = next(model.parameters()).device
    ids = torch.zeros(batch, seq, dtype=torch.long, device=dev)
    pipeline = ",".join(chunk_passes(chunks, mlp) + ([f"chunk_recompute{{chunks={chunks}}}"] if mlp else []))
    torch.compiler.reset()  # a fresh Dynamo cache: repeated traces (seq search) must not hit its size limit
    backend.LAST.clear()
    compiled = torch.compile(model, backend="unsloth", fullgraph=True,
                             options={"pipeline": pipeline, "lower": lower, "memory_budget": None})
    with cuda_like_tracing(), _eager_codegen():
        compiled(input_ids=ids, labels=ids)
    joint, ctx = backend.LAST.get("joint"), backend.LAST.get("ctx")
    torch.compiler.reset()
    if joint is None or ctx is None:
        raise RuntimeError("the backend produced no joint graph")
    pre = ctx.stats.get("pre_grad", {})
    applied = {"mlp": int(pre.get("split_token_chunks", {}).get("regions", 0)),
               "lm_head_ce": int(pre.get("fuse_linear_cross_entropy", {}).get("fused", 0))}
    notes = [] if applied["lm_head_ce"] else [
        "chunked LM head + CE not applied by fuse_linear_cross_entropy: "
        + str(pre.get("fuse_linear_cross_entropy", {}).get("skipped", ""))[:160]]
    return Traced(joint, ctx.num_fwd_outputs or 1, ctx.params, rows, len(joint.graph.nodes),
                  time.perf_counter() - t0, {k: (chunks if v else 0) for k, v in applied.items()}, notes)


@dataclass
class Variant:
    counts: tuple[int, int]  # (dense layers, MoE layers)
    static: M.Static
    base: M.Timeline
    minimum: M.Timeline
    joint: Any
    nfwd: int
    candidates: list[M.Timeline | None] = field(default_factory=list)  # minimum_candidates(): base first
    chunking: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    offload_minimum: M.Timeline | None = None  # the offload candidate (not in ``minimum``: see _variant)

    def act(self, tl: M.Timeline) -> int:
        """Peak bytes outside the optimizer step above the resident bytes (gradients in flight included)."""
        return _noopt_peak(tl) - self.static.resident

    def act_only(self, tl: M.Timeline) -> int:
        """The same peak without the gradients alive at that moment: activations and temporaries."""
        return _noopt_peak(tl, without_grads=True) - self.static.resident


def _noopt_peak(tl: M.Timeline, without_grads: bool = False) -> int:
    """The peak outside the optimizer step. An op's workspace (the fused LM head's chunk buffers, say) is
    no event, only a bump where the walker checks the peak: the timeline's own peak counts it, so it is
    taken whenever it is not in the optimizer step (before the seventh session it was missed, and a
    whole-model floor could come out under the check's by that workspace: 0.38 GiB on the 7B)."""
    best, grads = tl.static.resident, 0
    for e in tl.events:
        if e.category == "gradients":
            grads += e.bytes if e.kind == "alloc" else -e.bytes
        if e.phase != "optimizer":
            best = max(best, e.live_bytes - (grads if without_grads else 0))
    if not without_grads and tl.peak_phase != "optimizer":
        best = max(best, tl.peak)
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
    act_floor: int = 0  # bytes above resident at the minimum plan's peak (gradients in flight included)
    chunking: dict[str, int] = field(default_factory=dict)  # region kind -> chunks credited
    assumptions: list[str] = field(default_factory=list)

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


def _variant(name: str, counts: tuple[int, int], batch: int, seq: int, dtype, optimizer: Any, fuse: bool,
             dev: S.DeviceModel, progress, chunks: int | None = None, lower: str = "eager",
             overrides: dict | None = None, mlp: bool = True) -> Variant:
    from unsloth_fx.zoo import build_model

    dense, moe = counts
    kw: dict[str, Any] = {**(overrides or {}), "num_hidden_layers": dense + moe}
    if moe:
        kw["first_k_dense_replace"] = dense
    m = build_model(name, device="meta", **kw)
    tr = trace_step(m, batch, seq, dtype, chunks, lower, mlp)
    st = _set_lower(M.static_breakdown(tr.rows, optimizer, fuse), lower)
    st.inputs = M.inputs_bytes(tr.joint)
    cands = minimum_candidates(tr.joint, tr.nfwd, st, dev)
    # ``minimum`` leaves the offload candidate out: it is extrapolated over layers, and what offload
    # keeps on the device need not grow linearly; a whole-model trace adds it (estimate)
    base = cands[0]
    mn = min((c for c in cands[:OFFLOAD_CANDIDATE] if c is not None), key=lambda t: t.peak)
    if progress:
        what = f"{dense} dense + {moe} MoE layer(s)" if moe else f"{dense} layer(s)"
        progress(f"  traced {what} at seq {seq}: {tr.nodes} nodes, {tr.seconds:.1f} s"
                 + (f" (chunked: {', '.join(f'{k} x{v}' for k, v in tr.chunking.items() if v)})"
                    if any(tr.chunking.values()) else "")
                 + f"; activation peak {format_bytes(_noopt_peak(base) - st.resident)}")
    return Variant(counts, st, base, mn, tr.joint, tr.nfwd, cands, tr.chunking, tr.notes,
                   cands[OFFLOAD_CANDIDATE] if len(cands) > OFFLOAD_CANDIDATE else None)


def minimum_decisions(joint: Any, nfwd: int, saved_bytes: int, dev: S.DeviceModel) -> list:
    """``schedule.minimum_decisions``: the solver decisions behind :func:`minimum_candidates`."""
    return S.minimum_decisions(joint, nfwd, saved_bytes, dev)


# minimum_candidates' index of the offload candidate: a floor extrapolated over layers leaves it out
# (what fits on the device with offload need not grow linearly with the layers)
OFFLOAD_CANDIDATE = 4


def minimum_candidates(joint: Any, nfwd: int, st: M.Static, dev: S.DeviceModel,
                       decisions: list | None = None) -> list[M.Timeline | None]:
    """The timelines ``schedule.minimum_plan`` chooses among, in a fixed order (all saved; keep the
    fewest bytes; the MILP at 1/2 and 1/4 of the saved bytes; the fewest device bytes with offload,
    at :data:`OFFLOAD_CANDIDATE`; None where a solve gave no plan or offload is off). The first
    with the lowest peak is ``minimum_plan``'s. ``decisions``: :func:`minimum_decisions` of this
    graph, if already solved."""
    base = S.predict_base(joint, nfwd, st)
    decs = decisions if decisions is not None else minimum_decisions(joint, nfwd, base.saved_bytes, dev)
    plain = dataclasses.replace(dev, offload=False)
    devs = [plain] * (OFFLOAD_CANDIDATE - 1) + [dev]
    return [base] + [S._predict_tagged(joint, nfwd, st, d, v) if d else None for d, v in zip(decs, devs)]


def full_static(name: str, dtype, optimizer: Any, fuse: bool, batch: int, seq: int,
                lower: str = "eager", overrides: dict | None = None, workspace: int = 0) -> tuple[M.Static, Any]:
    from unsloth_fx.zoo import build_model

    m = build_model(name, device="meta", **(overrides or {}))
    rows = []
    for n, p in m.named_parameters():
        rows.append((p.numel(), dtype if p.is_floating_point() else p.dtype, True, False, n, tuple(p.shape)))
    for n, b in m.named_buffers():
        rows.append((b.numel(), b.dtype, False, True, n, tuple(b.shape)))
    st = _set_lower(M.static_breakdown(rows, optimizer, fuse), lower)
    st.inputs = 2 * M.round_block(batch * seq * 8)  # input_ids + labels (int64)
    st.workspace = workspace
    if workspace:  # planned for a GPU (as plan_memory on CUDA): the caching allocator's block slack too
        st.block_slack = A.block_slack(st.resident_requests)
    return st, m.config


def estimate(name: str, *, batch: int = 1, seq: int = 2048, dtype=torch.bfloat16, optimizer: Any = "adamw",
             fuse_optimizer: bool = False, budget: int | None = None, full: bool = False,
             dev: S.DeviceModel | None = None, progress: Callable[[str], None] | None = None,
             chunks: int | None = None, lower: str = "eager", overrides: dict | None = None,
             workspace: int = 0, chunk_mlp: bool = True) -> Estimate:
    """Predict (and, with ``budget``, plan) one training step of zoo model ``name``.

    ``optimizer``: a spec (``unsloth_fx.memory.model.parse_optimizer``: "adamw", "hybrid",
    "int8/int4", ...); ``fuse_optimizer``: the update runs inside backward; ``chunks``: trace
    with apply_optimizations' chunking passes at this many chunks (None: unchunked; ``chunk_mlp=False``:
    the LM head + CE only, the MLPs not chunked); ``lower``: the
    backend's lowering to model ("inductor": Inductor's decompositions and fusion, as plan_memory);
    ``overrides``: config overrides for the zoo model (e.g. ``num_hidden_layers``); ``workspace``: bytes
    reserved for the CUDA library workspaces (``plan_memory.CUDA_WORKSPACE_RESERVE`` on a GPU, 0 on CPU; when
    not 0, the caching allocator's block slack on parameters and optimizer state is counted too),
    resident through the step."""
    with S.partition_cache():  # the variants' candidates and the plan share partitions of the same graph
        return _estimate(name, batch, seq, dtype, optimizer, fuse_optimizer, budget, full, dev, progress, chunks,
                         lower, overrides, workspace, chunk_mlp)


def _estimate(name, batch, seq, dtype, optimizer, fuse_optimizer, budget, full, dev, progress, chunks, lower,
              overrides, workspace, chunk_mlp=True) -> Estimate:
    dev = dev or S.DeviceModel()
    st, config = full_static(name, dtype, optimizer, fuse_optimizer, batch, seq, lower, overrides, workspace)
    n_dense, n_moe = _layers(config)
    L = n_dense + n_moe
    opt_peak = st.resident + st.gradients + st.optimizer_temp

    def variant(counts: tuple[int, int]) -> Variant:
        return _variant(name, counts, batch, seq, dtype, optimizer, fuse_optimizer, dev, progress, chunks, lower,
                        overrides, mlp=chunk_mlp)

    if full or L <= 3:
        v = variant((n_dense, n_moe))
        if v.offload_minimum is not None and v.offload_minimum.peak < v.minimum.peak:
            v.minimum = v.offload_minimum  # the whole model: offload's floor counts (plan() reaches it)
        act_base, act_min, last, extrap, traced = v.act(v.base), v.act(v.minimum), v, False, [v.counts]
        acts = (v.act_only(v.base), v.act_only(v.minimum))
    else:
        if n_moe:
            A = variant((1, 1))
            B = variant((1, 2))
            C = variant((2, 1)) if n_dense > 1 else A

            def ext(f):
                return f(A) + (n_dense - 1) * (f(C) - f(A)) + (n_moe - 1) * (f(B) - f(A))
            traced = [A.counts, B.counts] + ([C.counts] if C is not A else [])
        else:
            A = variant((1, 0))
            B = variant((2, 0))

            def ext(f):
                return f(A) + (L - 1) * (f(B) - f(A))
            traced = [A.counts, B.counts]
        act_base = ext(lambda v: v.act(v.base))
        acts = (ext(lambda v: v.act_only(v.base)), ext(lambda v: v.act_only(v.minimum)))
        # the minimum plan's own peak, extrapolated: pessimistic when small variants' peaks sit on
        # terms that do not grow with the layers; extrapolating each candidate with
        # its own growth was tried and is NOT conservative (unchunked tiny-qwen2: 0.30x a full trace)
        act_min = ext(lambda v: v.act(v.minimum))
        last, extrap = B, True
    base_peak = max(st.resident + act_base, opt_peak)
    min_peak = max(st.resident + min(act_min, act_base), opt_peak)
    traced_layers = sum(last.counts)
    est = Estimate(name, batch, seq, st, base_peak, min_peak, opt_peak, traced, extrap, last.base,
                   scale=L / max(traced_layers, 1), activations=acts[0], min_activations=min(acts),
                   act_floor=min(act_min, act_base), chunking=dict(last.chunking))
    est.warnings.extend(dict.fromkeys(last.notes))
    est.assumptions = list(st.assumptions)
    done = [f"{k} x{v}" for k, v in last.chunking.items() if v]
    if chunks and done:
        est.assumptions.append("chunking credited (traced through apply_optimizations' passes): " + ", ".join(done))
    elif chunks:
        est.assumptions.append("no chunking credited (see the warning for why)")
    else:
        est.assumptions.append("no chunking (LM head logits and MLP intermediates whole)")
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


def _variant_dense(name, L, batch, seq, dtype, optimizer, fuse, dev, progress, chunks=None, lower="eager",
                   overrides=None) -> Variant:
    return _variant(name, (L, 0), batch, seq, dtype, optimizer, fuse, dev, progress, chunks, lower, overrides)


def largest_seq(name: str, budget: int, *, batch: int = 1, dtype=torch.bfloat16, optimizer: Any = "adamw",
                fuse_optimizer: bool = False, start: int = 2048, granularity: int = 256, max_evals: int = 7,
                progress: Callable[[str], None] | None = None, chunks: int | None = None,
                lower: str = "eager", workspace: int = 0, chunk_mlp: bool = True) -> int | None:
    """Largest sequence length (multiple of ``granularity``) whose minimum plan fits ``budget``,
    by bisection over concrete sequence lengths (each step re-traces the small variants).
    None: not even ``granularity`` tokens fit."""
    st, config = full_static(name, dtype, optimizer, fuse_optimizer, batch, granularity, lower, workspace=workspace)
    if max(st.resident, _opt(st)) > budget:
        return None
    limit = int(getattr(config, "max_position_embeddings", 1 << 17))
    fits: dict[int, bool] = {}

    def ok(s: int) -> bool:
        if s not in fits:
            e = estimate(name, batch=batch, seq=s, dtype=dtype, optimizer=optimizer, fuse_optimizer=fuse_optimizer,
                         chunks=chunks, lower=lower, workspace=workspace, chunk_mlp=chunk_mlp)
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
