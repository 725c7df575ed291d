"""``apply_optimizations``: the seed's one-call API over the ``unsloth`` backend.

    model, optimizer = unsloth_fx.apply_optimizations(model, target_vram="7GiB", lr=1e-5,
                                                      seq_len=2048, batch_size=1)

builds the optimizer, checks the budget *before* anything trains, and returns
``torch.compile(model, backend="unsloth", options={"memory_budget": target_vram, ...})``.

The early check (:func:`check_budget`):

* always, exactly: parameters + gradients + optimizer state (+ the optimizer's
  step temporaries) must fit; no activation can make that smaller;
* when ``seq_len`` is given and the model is a transformers causal LM: the
  planner (unsloth_fx.memory) traces the step on fake tensors (meta copies, no
  weights touched) and computes the smallest budget with every activation
  recomputed; models with more than 3 layers are traced at 1 and 2 layers and
  extrapolated (activation memory is linear in the layer count).

An infeasible target raises :class:`unsloth_fx.memory.schedule.InfeasibleBudget`
with the planner's breakdown and the smallest feasible budget. Without
``seq_len`` only the static check runs here, and the activation part is checked
by the ``plan_memory`` pass on the first step (the same error, raised from the
first forward).
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unsloth_fx.options import Options, format_bytes, parse_bytes

__all__ = ["apply_optimizations", "build_optimizer", "check_budget", "choose_tier_policy", "feature_status",
           "BudgetCheck", "TIER_LADDER"]

OPTIMIZERS = ("hybrid_adam", "adamw")

# What each piece of the end-to-end path needs, and whether it is there. A feature
# whose owner has not landed it yet is reported as "not available yet", never faked.


def _fuse_optimizer_available() -> bool:
    """True once the in-backward update exists: ``unsloth_fx.fusion.attach`` (the fuse_optimizer pass's runtime)."""
    try:
        import unsloth_fx.fusion as fusion
    except ImportError:
        return False
    return callable(getattr(fusion, "attach", None))


def feature_status() -> dict[str, str]:
    """{feature: "available" | "not available yet"} for the pieces apply_optimizations uses."""
    out: dict[str, str] = {}

    def probe(name: str, fn: Callable[[], bool]) -> None:
        try:
            out[name] = "available" if fn() else "not available yet"
        except Exception:  # a half-landed module must not break training
            out[name] = "not available yet"

    probe("memory_planner", lambda: __import__("unsloth_fx.memory.schedule", fromlist=["plan"]).plan is not None)
    probe("chunked_lm_head_ce", lambda: hasattr(
        __import__("unsloth_fx.runtime.linear_cross_entropy", fromlist=["patch_causal_lm"]), "patch_causal_lm"))
    probe("chunked_mlp", lambda: hasattr(
        __import__("unsloth_fx.passes.split_token_chunks", fromlist=["split_token_chunks"]), "split_token_chunks"))
    probe("fuse_optimizer", _fuse_optimizer_available)
    probe("hybrid_adam", lambda: hasattr(__import__("unsloth_fx.optim", fromlist=["HybridAdamW"]), "HybridAdamW"))
    return out


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(model: torch.nn.Module, optimizer: str | torch.optim.Optimizer = "hybrid_adam", lr: float = 1e-5,
                    **optimizer_options: Any) -> torch.optim.Optimizer:
    """``"hybrid_adam"``: :class:`unsloth_fx.optim.HybridAdamW` over ``model.named_parameters()``
    (names let it keep embeddings / LM head / norms in fp32 moments); ``"adamw"``: ``torch.optim.AdamW``
    (fused on CUDA). An ``Optimizer`` instance is returned as is."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to optimize")
    if optimizer == "hybrid_adam":
        from unsloth_fx.optim import HybridAdamW

        return HybridAdamW(params, lr=lr, **optimizer_options)
    if optimizer == "adamw":
        cuda = all(p.is_cuda for _, p in params)
        optimizer_options.setdefault("fused", True if cuda else None)
        return torch.optim.AdamW(params, lr=lr, **optimizer_options)  # named: the planner counts it by name
    raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(repr(o) for o in OPTIMIZERS)} "
                     "or a torch.optim.Optimizer instance")


def planner_optimizer_key(model: torch.nn.Module, optimizer: str | torch.optim.Optimizer,
                          optimizer_options: dict[str, Any] | None = None) -> str:
    """The planner's optimizer spec (``unsloth_fx.memory.model.parse_optimizer``) for the
    optimizer's state bytes: "hybrid", "int8/int4", ... for HybridAdamW (its first group's
    ``state_precision`` / ``high_precision_tier``, or ``optimizer_options``), "adamw" /
    "adamw-bf16" for torch AdamW. An instance is counted exactly by :func:`check_budget`;
    this string is what the plan_memory pass gets through the pipeline."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if type(optimizer).__name__ == "HybridAdamW":
            g = optimizer.param_groups[0]
            return _spec(g["state_precision"], g.get("high_precision_tier", "fp32"))
        optimizer = "adamw"
    if optimizer == "hybrid_adam":
        o = optimizer_options or {}
        return _spec(o.get("state_precision", "hybrid"), o.get("high_precision_tier", "fp32"))
    low = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters() if p.requires_grad)
    return "adamw-bf16" if low else "adamw"


def _spec(state_precision: str, high_precision_tier: str = "fp32") -> str:
    from unsloth_fx.memory.model import StatePolicy

    return StatePolicy(state_precision=state_precision, high_precision_tier=high_precision_tier).key


# Optimizer-state policies apply_optimizations tries, most precise first, when the user
# did not fix HybridAdamW's tiers: (spec, state_precision, high_precision_tier, why).
# Evidence, docs/benchmarks.md (HybridAdamW convergence, 63M-parameter Qwen2, 1000 steps,
# 3 seeds): int8 moments ended within the fp32 reference's seed spread (val loss 1.1351 vs
# 1.1255, spread 1.0942-1.1547); hybrid (1.1745, +4.4%) and int4 (1.1899, +5.7%) did not.
# That run kept embeddings fp32 (a 256-token vocabulary), so quantized *embeddings* are
# not measured at all: the ladder gives them up only after the body's tier, and int4 last.
TIER_LADDER = (
    ("hybrid", "hybrid", "fp32", "HybridAdamW's default: hybrid moments, embeddings / LM head fp32 "
                                  "(what apply_optimizations always built before)"),
    ("int8/int8", "int8", "int8", "int8 moments everywhere but norms / biases: the only quantized tier that matched "
                                  "the fp32 reference within its seed spread (docs/benchmarks.md)"),
    ("hybrid/int4", "hybrid", "int4", "hybrid body, embeddings / LM head int4: hybrid missed the reference by 4.4%"),
    ("int4/int4", "int4", "int4", "int4 moments everywhere but norms / biases: the smallest state; int4 missed the "
                                  "reference by 5.7%"),
)
_TIER_KEYS = ("state_precision", "high_precision_tier", "quantize_all")


# ----------------------------------------------------------------------------- the early check


@dataclass
class BudgetCheck:
    """What :func:`check_budget` found. All sizes in bytes."""

    budget: int | None
    parameters: int
    gradients: int
    optimizer_state: int
    optimizer_temp: int
    static_peak: int  # parameters + gradients + optimizer state + step temporaries
    smallest_feasible: int | None = None  # with activations (None: not traced)
    predicted_peak: int | None = None  # with every activation saved (None: not traced)
    traced_layers: list[int] = field(default_factory=list)
    extrapolated: bool = False
    notes: list[str] = field(default_factory=list)
    optimizer: str = ""  # the planner spec (or optimizer class) the state was counted for
    state_by_tier: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        if self.budget is None:
            return True
        need = self.smallest_feasible if self.smallest_feasible is not None else self.static_peak
        return need <= self.budget

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("budget", "parameters", "gradients", "optimizer_state", "optimizer_temp",
                                               "static_peak", "smallest_feasible", "predicted_peak", "traced_layers",
                                               "extrapolated", "notes", "optimizer", "state_by_tier",
                                               "assumptions")} | {"feasible": self.feasible}


def _rows(model: torch.nn.Module) -> list[tuple]:
    """(numel, dtype, requires_grad, is_buffer, name, shape) per tensor: names and shapes make
    the planner count HybridAdamW's state per parameter, with its own tier policy."""
    rows = [(p.numel(), p.dtype, p.requires_grad, False, n, tuple(p.shape)) for n, p in model.named_parameters()]
    return rows + [(b.numel(), b.dtype, False, True, n, tuple(b.shape)) for n, b in model.named_buffers()]


def _is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "get_output_embeddings")


from unsloth_fx.memory.whole import _layers  # noqa: E402  (dense and MoE layer counts; one definition)


def _meta_copy(model: torch.nn.Module, dense: int, moe: int) -> torch.nn.Module:
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = dense + moe
    if moe:
        cfg.first_k_dense_replace = dense
    if hasattr(cfg, "layer_types") and isinstance(cfg.layer_types, list):
        cfg.layer_types = cfg.layer_types[: dense + moe]
    cfg.use_cache = False
    with torch.device("meta"):
        m = type(model)(cfg)
    # the trained dtypes (e.g. bf16 weights), and the same frozen parameters (LoRA-style)
    src = dict(model.named_parameters())
    for n, p in m.named_parameters():
        ref = src.get(n)
        if ref is not None:
            p.data = p.data.to(ref.dtype)
            p.requires_grad_(ref.requires_grad)
        else:
            p.data = p.data.to(next(iter(src.values())).dtype)
    return m


def _trace_key(model: torch.nn.Module, counts: tuple[int, int], batch: int, seq: int, chunks: int | None,
               lower: str, chunk_mlp: bool = True) -> tuple:
    """The key of a step trace in :func:`_activation_floor`'s cache (traces do not depend on the optimizer)."""
    return (id(model), counts, batch, seq, chunks, lower) + (() if chunk_mlp or not chunks else ("lm_head only",))


def _pipeline_offloads(pipeline: str) -> bool:
    """Whether ``pipeline``'s plan_memory may offload (False when it says ``offload=false``)."""
    flat = pipeline.replace("{OPTIMIZER}", "").replace(" ", "").lower()
    return not re.search(r"plan_memory\{[^}]*offload=(false|0)\b", flat)


def _workspace_reserve(model: torch.nn.Module) -> int:
    """The bytes plan_memory reserves for CUDA library workspaces when the model is on CUDA, else 0."""
    from unsloth_fx.passes.plan_memory import CUDA_WORKSPACE_RESERVE

    p = next(model.parameters(), None)
    return CUDA_WORKSPACE_RESERVE if p is not None and p.is_cuda else 0


def _activation_floor(model: torch.nn.Module, counts: tuple[int, int], batch: int, seq: int, optimizer: str,
                      fuse: bool, chunks: int | None = None, cache: dict | None = None,
                      notes: list[str] | None = None, lower: str = "inductor",
                      offload: bool = True, chunk_mlp: bool = True) -> tuple[int, list[int | None]]:
    """(bytes above resident at the step's peak with every activation saved, the same per minimum-plan
    candidate (``unsloth_fx.memory.whole.minimum_candidates`` order; None: no plan)). The minimum
    plan's floor is the lowest candidate; extrapolating each candidate with its own per-layer growth
    is why they are returned apart.

    The step is traced as the compile will run it (``unsloth_fx.memory.whole.trace_step``: with
    ``chunks``, through the backend with the same chunking passes apply_optimizations adds; with
    ``lower``, the backend's lowering: "inductor", its default, traces with Inductor's decompositions
    and plans with its fusion, as plan_memory does). ``cache`` reuses traces across optimizer
    policies (the trace does not depend on them), and each policy's candidates across checks (the
    tier ladder's, then apply_optimizations' final one). ``offload``: whether plan_memory may offload
    (else the offload candidate is None). ``chunk_mlp=False``: with ``chunks``, the LM head + CE only."""
    from unsloth_fx.memory.whole import OFFLOAD_CANDIDATE, trace_step

    key = _trace_key(model, counts, batch, seq, chunks, lower, chunk_mlp)
    cache = {} if cache is None else cache
    tr = cache.get(key)
    if tr is None:
        tr = cache[key] = trace_step(_meta_copy(model, *counts), batch, seq, dtype=None, chunks=chunks, lower=lower,
                                     mlp=chunk_mlp)
    if notes is not None:
        notes.extend(n for n in tr.notes if n not in notes)
    done = cache.get((key, "floor", optimizer, fuse))
    if done is None:  # else the same policy was checked before (the tier ladder, then apply_optimizations' final check)
        done = cache[key, "floor", optimizer, fuse] = _candidate_floors(tr, optimizer, fuse, lower, cache, key)
    act, cands = done
    if not offload:  # the same candidates but the offload one (it is solved and predicted apart from the others)
        cands = [None if i == OFFLOAD_CANDIDATE else c for i, c in enumerate(cands)]
    return act, cands


def _candidate_floors(tr: Any, optimizer: str, fuse: bool, lower: str, cache: dict,
                      key: Any) -> tuple[int, list[int | None]]:
    from unsloth_fx.memory import model as M
    from unsloth_fx.memory import schedule as S
    from unsloth_fx.memory.whole import _set_lower, minimum_candidates, minimum_decisions

    st = _set_lower(M.static_breakdown(tr.rows, optimizer, fuse), lower)
    st.inputs = M.inputs_bytes(tr.joint)
    dev = S.DeviceModel()
    # the partitioned graphs depend on the trace and the decisions, not on the policy: partitioned once per
    # trace, walked again per policy
    with S.partition_cache(cache.setdefault((key, "partitions"), {})):
        base = S.predict_base(tr.joint, tr.nfwd, st)
        if (key, "decisions") not in cache:  # the solves depend on the graph only: once per trace
            cache[key, "decisions"] = minimum_decisions(tr.joint, tr.nfwd, base.saved_bytes, dev)
        cands = minimum_candidates(tr.joint, tr.nfwd, st, dev, list(cache[key, "decisions"]))
    return cands[0].peak - st.resident, [None if c is None else c.peak - st.resident for c in cands]


def _floor_ext(vals: list[tuple[int, list[int | None]]], ext) -> tuple[int, int]:
    """(all-saved, minimum plan) bytes above resident for the whole model: ``ext`` (linear in the
    layers) applied to all-saved and to each variant's minimum plan (its lowest candidate), as
    ``unsloth_fx.memory.whole.estimate``. Conservative, and pessimistic where the small variants'
    lowest candidate peaks at a point recompute cannot lower (r1-distill-qwen-1.5b, seq 2048, int4
    tiers, fused: 7.06 GiB extrapolated, 6.39 GiB traced whole): :func:`check_budget` then traces
    the whole model before refusing."""
    from unsloth_fx.memory.whole import OFFLOAD_CANDIDATE

    act = ext([v[0] for v in vals])
    return act, min(ext([min(c for c in v[1][:OFFLOAD_CANDIDATE] if c is not None) for v in vals]), act)


def _offload_ext(vals: list[tuple[int, list[int | None]]], ext) -> int | None:
    """The offload candidate's bytes above resident, extrapolated over layers as :func:`_floor_ext`
    does. Not conservative (what offload keeps on the device need not grow linearly with the
    layers): only a hint of whether a trace of all layers is worth making. None: no candidate."""
    from unsloth_fx.memory.whole import OFFLOAD_CANDIDATE

    offs = [v[1][OFFLOAD_CANDIDATE] if len(v[1]) > OFFLOAD_CANDIDATE else None for v in vals]
    return None if any(o is None for o in offs) else ext(offs)


def check_budget(model: torch.nn.Module, target_vram: Any, *, optimizer: str | torch.optim.Optimizer = "hybrid_adam",
                 fuse_optimizer: bool = False, seq_len: int | None = None, batch_size: int = 1,
                 device_total: int | None = None, chunks: int | None = None,
                 optimizer_options: dict[str, Any] | None = None, lower: str = "inductor",
                 offload: bool = True, chunk_mlp: bool = True, _cache: dict | None = None) -> BudgetCheck:
    """Check ``target_vram`` before training; raises ``InfeasibleBudget`` when the step cannot fit.

    ``target_vram``: bytes, ``"7GiB"``, a fraction of ``device_total`` or None (no check).
    ``optimizer``: ``"hybrid_adam"`` (HybridAdamW with ``optimizer_options``' tiers), ``"adamw"``,
    a planner spec such as ``"int8/int4"``, or an optimizer instance, whose own state layout
    is counted (the state it holds, or what its first step will allocate).
    ``seq_len`` / ``batch_size``: the training shape (tokens per row, rows); without
    ``seq_len`` only parameters + gradients + optimizer state are checked here.
    ``chunks``: credit apply_optimizations' chunking passes (chunked LM head + CE, token-chunked
    MLPs) at this many chunks: the floor is traced through those passes. ``chunk_mlp=False``: the
    chunked LM head + CE only (the MLPs left to plan_memory's recompute).
    ``lower``: the backend's lowering the compile will use ("inductor", its default, or "eager"):
    the floor is traced and planned as plan_memory does under it.
    ``offload``: whether plan_memory may offload activations to host memory (its ``offload`` option);
    a whole-model floor then counts the plan that keeps the fewest bytes on the device with offload,
    which plan_memory falls back to when no faster plan fits.

    Models of more than 3 layers are traced at 1 and 2 layers (MoE: 1+1, 1+2, 2+1) and the
    activations extrapolated linearly. When that refuses ``target_vram`` but the static bytes plus
    half the extrapolated activation floor fit, all layers are traced before deciding (a line is
    printed; minutes on a CPU for a 1.5B model), and ``BudgetCheck.notes`` says so.
    """
    from unsloth_fx.memory import allocator as A
    from unsloth_fx.memory import model as M
    from unsloth_fx.memory.schedule import InfeasibleBudget

    budget = parse_bytes(target_vram)
    if isinstance(budget, float):
        if device_total is None:
            raise ValueError(f"target_vram={target_vram!r} is a fraction of device memory, but the device's memory "
                             "is unknown here (CPU or meta); give bytes, e.g. '7GiB'")
        budget = int(budget * device_total)
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        key = optimizer  # a planner spec ("int8/int4", ...)
        M.parse_optimizer(key)
    else:
        key = planner_optimizer_key(model, optimizer, optimizer_options)
    counted = optimizer if isinstance(optimizer, torch.optim.Optimizer) else key
    st = M.static_breakdown(_rows(model), counted, fuse_optimizer)
    # plan_memory reserves the cuBLAS / cuBLASLt workspaces on CUDA (no graph node makes them): so does the check,
    # or a budget it accepts by less than that fails the compile
    ws = _workspace_reserve(model)
    # and the caching allocator's block slack on parameters and optimizer state, as plan_memory counts it there
    if ws and A.default_settings():
        st.block_slack = A.block_slack(st.resident_requests)
    static_peak = (st.parameters + st.buffers + st.gradients + st.optimizer_state + st.optimizer_temp + ws
                   + st.block_slack)
    chk = BudgetCheck(budget, st.parameters + st.buffers, st.gradients, st.optimizer_state, st.optimizer_temp,
                      static_peak)
    chk.optimizer, chk.state_by_tier, chk.assumptions = st.optimizer, dict(st.state_by_tier), list(st.assumptions)
    if chunks and seq_len is not None:
        chk.assumptions.append(f"chunked LM head + CE{' and token-chunked MLPs' if chunk_mlp else ''} ({chunks} "
                               "chunks), traced through the same passes"
                               + ("" if chunk_mlp else "; the MLPs not chunked (left to plan_memory's recompute)"))
    temp_name = "largest gradient + its fused update" if fuse_optimizer else "optimizer step temporaries"
    text = (f"parameters {format_bytes(chk.parameters)} + gradients {format_bytes(st.gradients)} + optimizer state "
            f"{format_bytes(st.optimizer_state)} ({st.optimizer}) + {temp_name} {format_bytes(st.optimizer_temp)}"
            + (f" + CUDA library workspaces {format_bytes(ws)}" if ws else "")
            + (f" + allocator block slack {format_bytes(st.block_slack)}" if st.block_slack else ""))
    if budget is not None and static_peak > budget:
        smallest = int(math.ceil(static_peak / 2**20) * 2**20)
        hint = "" if fuse_optimizer else "; fusing the optimizer into backward (fuse_optimizer) would drop the gradients"
        raise InfeasibleBudget(
            f"target_vram={format_bytes(budget)} is infeasible before any activation: {text} = "
            f"{format_bytes(static_peak)}; smallest feasible budget at least {format_bytes(smallest)}{hint}",
            smallest_feasible=smallest,
            breakdown={"parameters": chk.parameters, "gradients": st.gradients, "optimizer_state": st.optimizer_state,
                       "optimizer_temp": st.optimizer_temp})
    if seq_len is None:
        chk.notes.append("activations not checked before training (no seq_len): plan_memory checks them on the "
                         "first step")
        return chk
    config = getattr(model, "config", None)
    if not _is_hf_causal_lm(model) or not hasattr(config, "num_hidden_layers"):
        chk.notes.append("activations not checked before training (not a transformers causal LM)")
        return chk
    dense, moe = _layers(config)
    L = dense + moe
    # the floor's own static bytes only set its resident baseline: count it with the spec
    fk = dict(optimizer=key, fuse=fuse_optimizer, chunks=chunks, cache=_cache if _cache is not None else {},
              notes=chk.notes, lower=lower, offload=offload, chunk_mlp=chunk_mlp)
    resident = st.parameters + st.buffers + st.optimizer_state + ws + st.block_slack
    opt_peak = resident + st.gradients + st.optimizer_temp

    def whole() -> tuple[int, int]:
        act, mins = _activation_floor(model, (dense, moe), batch_size, seq_len, **fk)
        chk.traced_layers, chk.extrapolated = [L], False
        return act, min([m for m in mins if m is not None] + [act])

    if L <= 3:
        act, act_min = whole()
    else:
        if moe:
            vals = [_activation_floor(model, c, batch_size, seq_len, **fk) for c in ((1, 1), (1, 2))]
            vals.append(_activation_floor(model, (2, 1), batch_size, seq_len, **fk) if dense > 1 else vals[0])
            ext = lambda x: x[0] + (dense - 1) * (x[2] - x[0]) + (moe - 1) * (x[1] - x[0])  # noqa: E731
            chk.traced_layers, chk.extrapolated = [2, 3], True
        else:
            vals = [_activation_floor(model, (n, 0), batch_size, seq_len, **fk) for n in (1, 2)]
            ext = lambda x: x[0] + (L - 1) * (x[1] - x[0])  # noqa: E731
            chk.traced_layers, chk.extrapolated = [1, 2], True
        act, act_min = _floor_ext(vals, ext)
        off = _offload_ext(vals, ext)
        floor = max(resident + min(act, act_min), opt_peak)
        # the extrapolation refuses a budget the whole graph may fit (full traces came in at 0.66x to
        # 0.84x of its activation floor on the models checked, and offload lowers it further): decide on
        # all layers, unless even half that floor (or half the offload candidate's extrapolation) is over
        hint = min(act, act_min) if off is None else min(act, act_min, max(off, 0))
        if budget is not None and floor > budget >= max(resident + hint // 2, opt_peak):
            traced = _trace_key(model, (dense, moe), batch_size, seq_len, chunks, lower, chunk_mlp) in fk["cache"]
            print(f"unsloth_fx.check_budget: {format_bytes(budget)} is below the floor extrapolated from "
                  f"{chk.traced_layers} layers ({format_bytes(floor)}); " + (
                      f"deciding on the trace of all {L} layers made earlier" if traced else
                      f"tracing all {L} layers to decide (minutes on a CPU for a 1.5B model)"), flush=True)
            t0 = time.perf_counter()
            act, act_min = whole()
            chk.notes.append(f"the layer extrapolation's floor ({format_bytes(floor)}) was replaced by a trace of all "
                             f"{L} layers (" + ("made earlier" if traced else f"{time.perf_counter() - t0:.0f} s")
                             + "): floor "
                             f"{format_bytes(max(resident + min(act, act_min), opt_peak))}")
    chk.predicted_peak = max(resident + act, opt_peak)
    floor = max(resident + min(act, act_min), opt_peak)
    chk.smallest_feasible = int(math.ceil(floor / 2**20) * 2**20)
    if budget is not None and chk.smallest_feasible > budget:
        if resident + min(act, act_min) >= opt_peak:
            # at the peak: resident bytes + activations and the gradients alive then (all terms exact, summed)
            acts = min(act, act_min)
            terms = (f"parameters {format_bytes(chk.parameters)} + optimizer state {format_bytes(st.optimizer_state)} "
                     f"({st.optimizer}) + " + (f"CUDA library workspaces {format_bytes(ws)} + " if ws else "")
                     + (f"allocator block slack {format_bytes(st.block_slack)} + " if st.block_slack else "")
                     + f"minimum activations and in-flight gradients {format_bytes(acts)}")
        else:
            acts = 0
            terms = text
        raise InfeasibleBudget(
            f"target_vram={format_bytes(budget)} is infeasible for batch {batch_size} x seq {seq_len}: {terms} = "
            f"{format_bytes(floor)}"
            + (f" (extrapolated from {chk.traced_layers} traced layers)" if chk.extrapolated else "")
            + f"; smallest feasible budget {format_bytes(chk.smallest_feasible)}",
            smallest_feasible=chk.smallest_feasible,
            breakdown={"parameters": chk.parameters, "gradients": st.gradients, "optimizer_state": st.optimizer_state,
                       "minimum_activations": acts})
    return chk


# ----------------------------------------------------------------------------- the one call


def _device_total(model: torch.nn.Module) -> int | None:
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        return torch.cuda.get_device_properties(p.device).total_memory
    return None


def apply_optimizations(model: torch.nn.Module, target_vram: Any = "7GiB", optimizer: str = "hybrid_adam",
                        lr: float = 1e-5, *, seq_len: int | None = None, batch_size: int = 1,
                        fuse_optimizer: bool | None = None, chunk_lm_head: bool = True, chunks: int | str = "auto",
                        grad_accum: int = 1, optimizer_options: dict[str, Any] | None = None, dynamic: bool | None = None,
                        check: bool = True, **options: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Compile ``model`` for training within ``target_vram`` and build its optimizer.

    Returns ``(compiled_model, optimizer)``; ``compiled_model.ufx_report`` holds the
    early check (:class:`BudgetCheck` summary), the backend options used and
    :func:`feature_status`.

    * ``target_vram``: bytes, ``"7GiB"``, a fraction of the card's memory, or None (no budget).
    * ``optimizer``: ``"hybrid_adam"`` (HybridAdamW) or ``"adamw"`` (torch AdamW); ``lr`` its learning rate;
      ``optimizer_options`` go to its constructor.
    * Optimizer-state tiers: with ``"hybrid_adam"``, a ``target_vram`` and no tier in ``optimizer_options``
      (``state_precision`` / ``high_precision_tier`` / ``quantize_all``), the first policy of
      :data:`TIER_LADDER` (most precise first) that fits is chosen (:func:`choose_tier_policy`), printed,
      and recorded in ``ufx_report["optimizer_policy"]``; none fitting raises ``InfeasibleBudget`` with
      each policy's smallest feasible budget. The final check counts the built optimizer's own layout.
    * ``seq_len``, ``batch_size``: the training shape, for the before-training activation check.
    * ``fuse_optimizer``: run the update inside backward (HybridAdamW only; ``unsloth_fx.fusion.attach``
      binds it with ``grad_accum`` micro-batches per step); None = on when available and the optimizer is
      HybridAdamW. True when it is not available raises, so a user who asked for it knows.
    * ``chunk_lm_head``: patch a transformers ``*ForCausalLM`` to drop logits in training
      (``patch_causal_lm``) and add the chunked LM-head cross-entropy and MLP passes
      (``chunks`` token chunks each). ``chunks="auto"`` (default): with ``seq_len``, a budget and
      ``check``, no chunking when the unchunked step fits the budget with the optimizer asked for
      (HybridAdamW's default tiers when it chooses them), since chunking costs throughput (23-25% on
      r1-distill-qwen-1.5b, docs/benchmarks.md); else 8 chunks, and once the optimizer's tier is chosen, the
      MLPs are left unchunked (only the LM head + CE chunked) when that step still fits without offload: the
      chunked MLPs triple the backward's matmul launches (r1-distill-qwen-1.5b at 7 GiB, docs/memory.md).
      Without that information: 8, both. An int ``chunks`` chunks both. The chunked
      LM head sums its weight gradient in the weight dtype (the pass's memory-saving default,
      ``grad_weight_accum="weight_dtype"``: no ``vocab x hidden`` fp32 buffer, one rounding per chunk);
      a ``pipeline`` with ``fuse_linear_cross_entropy{chunks=8,grad_weight_accum=fp32}`` keeps fp32.
    * other ``options``: backend options (``lower``, ``dump``, ``share_weights``, ``pipeline``, ``verify``, ...).
    """
    features = feature_status()
    optimizer_options = dict(optimizer_options or {})
    hybrid = optimizer == "hybrid_adam" or type(optimizer).__name__ == "HybridAdamW"
    if fuse_optimizer is None:
        fuse_optimizer = features["fuse_optimizer"] == "available" and hybrid
    elif fuse_optimizer and features["fuse_optimizer"] != "available":
        raise NotImplementedError("fuse_optimizer=True: the in-backward optimizer update is not available yet "
                                  "(no unsloth_fx.fusion.attach); pass fuse_optimizer=False")
    elif fuse_optimizer and not hybrid:
        raise ValueError(f"fuse_optimizer=True needs optimizer='hybrid_adam' (HybridAdamW), got "
                         f"{optimizer if isinstance(optimizer, str) else type(optimizer).__name__}")
    from unsloth_fx.memory.whole import chunk_passes

    pipeline = options.pop("pipeline", None)
    own_pipeline = pipeline is None  # the MLP-chunking choice and its margin rewrite only a pipeline built here
    # the lowering the compile will use (the option, else UNSLOTH_FX_LOWER, else inductor): the
    # early check traces and plans the step under it, as plan_memory will
    lower = Options.from_user({k: options[k] for k in ("lower",) if k in options}).lower
    chunking = False
    traces: dict = {}  # step traces keyed by (model, layers, shape, chunks, lowering): shared by every check below
    auto = chunks == "auto"
    if auto:
        chunks = 8
        if (pipeline is None and chunk_lm_head and check and seq_len is not None and target_vram is not None
                and _is_hf_causal_lm(model)):
            from unsloth_fx.memory.schedule import InfeasibleBudget

            first = optimizer if (optimizer != "hybrid_adam" or any(k in optimizer_options for k in _TIER_KEYS)) \
                else TIER_LADDER[0][0]
            try:
                check_budget(model, target_vram, optimizer=first, fuse_optimizer=bool(fuse_optimizer) and grad_accum == 1,
                             seq_len=seq_len, batch_size=batch_size, device_total=_device_total(model),
                             optimizer_options=optimizer_options if first == optimizer else None,
                             lower=lower, offload=False, _cache=traces)
                # fits unchunked without offload: keep the faster graph (an unchunked step that fits only by
                # offloading whatever it can is slower than the chunked one)
                chunk_lm_head = False
                print("unsloth_fx.apply_optimizations: the unchunked step fits the budget; no chunking (planned "
                      f"{PLAN_MARGIN:.1%} under it where it can be)")
            except InfeasibleBudget:
                pass
    elif not (isinstance(chunks, int) and chunks >= 1):
        raise ValueError(f"chunks={chunks!r}: expected a positive int or 'auto'")
    if pipeline is None:
        pipeline = _PLAN  # the spec is known once the optimizer is built
        if not chunk_lm_head and target_vram is not None:  # the MLPs are not chunked: plan with the margin
            pipeline = pipeline.replace(_PLAN, _PLAN_MARGIN)
        if chunk_lm_head and _is_hf_causal_lm(model):
            need = {"split_token_chunks": "chunked_mlp", "fuse_linear_cross_entropy": "chunked_lm_head_ce"}
            passes = [p for p in chunk_passes(chunks) if features[need[p.split("{")[0]]] == "available"]
            if any(p.startswith("fuse_linear_cross_entropy") for p in passes):
                from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

                patch_causal_lm(model)
            pipeline += "".join(",+" + p for p in passes)
            # the early check traces with both passes; credit chunking only when the compile runs both
            chunking = len(passes) == 2
    else:
        chunking = all(p.split("{")[0] in pipeline for p in chunk_passes(chunks))
        if "fuse_linear_cross_entropy" in pipeline and _is_hf_causal_lm(model):
            from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

            patch_causal_lm(model)  # else the logits stay a graph output and the pass must skip the LM head
    # with gradient accumulation the fused update keeps every gradient between micro-batches
    # plan_memory{offload=false} in a caller's pipeline: the check must not count offload either
    offload = _pipeline_offloads(pipeline)
    check_kw = dict(fuse_optimizer=bool(fuse_optimizer) and grad_accum == 1, seq_len=seq_len, batch_size=batch_size,
                    device_total=_device_total(model), chunks=chunks if chunking else None,
                    lower=lower, offload=offload, _cache=traces)  # the lowering the compile will use
    policy = None
    if (check and target_vram is not None and optimizer == "hybrid_adam"
            and not any(k in optimizer_options for k in _TIER_KEYS)):
        policy = choose_tier_policy(model, target_vram, **check_kw)
        optimizer_options.update(state_precision=policy["state_precision"],
                                 high_precision_tier=policy["high_precision_tier"])
        print(f"unsloth_fx.apply_optimizations: optimizer state {policy['chosen']} ({policy['why']}); "
              f"smallest feasible budget {format_bytes(policy['smallest_feasible'])} <= "
              f"{format_bytes(policy['budget'])}")
    opt = build_optimizer(model, optimizer, lr, **optimizer_options)
    if fuse_optimizer:
        from unsloth_fx.fusion import attach

        attach(model, opt, accumulation_steps=grad_accum)
    chk = None
    if auto and own_pipeline and chunking and check and seq_len is not None and target_vram is not None:
        chk = _without_mlp_chunks(model, target_vram, opt, check_kw)
        if chk is not None:
            pipeline = pipeline.replace(",+" + chunk_passes(chunks)[0], "").replace(_PLAN, _PLAN_MARGIN)
    if check and chk is None:
        # the optimizer itself: its exact state layout
        chk = check_budget(model, target_vram, optimizer=opt, **check_kw)
    if own_pipeline and _PLAN in pipeline and chk is not None and chk.budget and chk.smallest_feasible is not None:
        if chk.smallest_feasible <= chk.budget * (1.0 - PLAN_MARGIN):
            pipeline = pipeline.replace(_PLAN, _PLAN_MARGIN)
        else:
            print(f"unsloth_fx.apply_optimizations: no {PLAN_MARGIN:.1%} margin under the budget (smallest feasible "
                  f"{format_bytes(chk.smallest_feasible)} of {format_bytes(chk.budget)}): the planner was 1-2% under "
                  "the measured peak on an H100 (docs/memory.md), so the step may exceed the budget by that much",
                  flush=True)
    key = planner_optimizer_key(model, opt)
    pipeline = pipeline.replace("{OPTIMIZER}", key)
    backend_options = {"memory_budget": target_vram, "fuse_optimizer": bool(fuse_optimizer), "pipeline": pipeline,
                       **options}
    Options.from_user(backend_options)  # bad options fail here, not on the first step
    compiled = torch.compile(model, backend="unsloth", options=backend_options, dynamic=dynamic)
    compiled.ufx_report = {"check": chk.summary() if chk else None, "options": backend_options,
                           "features": features, "optimizer": type(opt).__name__,
                           "optimizer_policy": policy or {"chosen": key, "why": "fixed by the caller"
                                                          if hybrid else "not HybridAdamW: no tier choice"},
                           "assumptions": (chk.assumptions if chk else []) + (
                               [f"chunked LM head + CE{' and token-chunked MLPs' if 'split_token_chunks' in pipeline else ''}"
                                " in the pipeline; the LM-head gradient summed in the weight dtype "
                                "(fuse_linear_cross_entropy's default grad_weight_accum=weight_dtype: no vocab x hidden "
                                "fp32 buffer)"] if chunking else [])}
    return compiled, opt


# The static model under-predicts the card: on an H100 (docs/benchmarks.md, twelfth session) r1-distill-qwen-1.5b
# at 7 GiB with the LM head + CE chunked alone was planned to 6.99 GiB and measured 7.07 GiB (+1.1%), and planned
# with this margin to 6.82 GiB it measured 6.93 GiB (+1.6%), at the same speed; the fourth session's grid
# measured 0.7-1.8% over its predictions. So plan_memory aims this fraction under the budget in the pipelines
# apply_optimizations builds: always when it leaves the MLPs unchunked (the margin is soft: plan_memory plans to
# the budget itself, with a warning, where the margin is infeasible), and with the MLPs chunked when the check's
# smallest feasible budget leaves room for it (else a line says the step has no such headroom).
PLAN_MARGIN = 0.025
_PLAN = "default,plan_memory{optimizer={OPTIMIZER}}"
_PLAN_MARGIN = f"default,plan_memory{{optimizer={{OPTIMIZER}},margin={PLAN_MARGIN}}}"


def _without_mlp_chunks(model: torch.nn.Module, target_vram: Any, opt: torch.optim.Optimizer,
                        check_kw: dict[str, Any]) -> BudgetCheck | None:
    """The final check of the step with only the LM head + CE chunked, without offload, or None when that
    step does not fit (the MLPs then stay chunked; when it fits, the compile plans it
    :data:`PLAN_MARGIN` under the budget where it can). On
    r1-distill-qwen-1.5b at 7 GiB (seq 2048, int4/int4, fused) it is 0.69x stock compile AMP's tokens/s against
    0.51x with the MLPs chunked (H100, docs/benchmarks.md); the step that offloads is not taken, since
    offloading whatever it can is slower than chunking."""
    from unsloth_fx.memory.schedule import InfeasibleBudget

    try:
        chk = check_budget(model, target_vram, optimizer=opt, **{**check_kw, "chunk_mlp": False, "offload": False})
    except InfeasibleBudget as e:
        print("unsloth_fx.apply_optimizations: the MLPs stay chunked (with the LM head + CE chunked alone the "
              f"smallest feasible budget is {format_bytes(e.smallest_feasible)} without offload)", flush=True)
        return None
    print("unsloth_fx.apply_optimizations: the step fits with the LM head + CE chunked and the MLPs not; "
          f"no MLP chunking (fewer kernels; planned {PLAN_MARGIN:.1%} under the budget where it can be)",
          flush=True)
    return chk


def choose_tier_policy(model: torch.nn.Module, target_vram: Any, **check_kw: Any) -> dict[str, Any]:
    """The first HybridAdamW state policy of :data:`TIER_LADDER` (most precise first) whose
    step fits ``target_vram``, by :func:`check_budget` (``check_kw``: its keywords): the ladder
    without offload first, then, if none fits and ``check_kw["offload"]`` allows, with it.

    Returns {"chosen", "state_precision", "high_precision_tier", "why", "smallest_feasible",
    "budget", "tried": [{"policy", "offload", "smallest_feasible", "fits"}]}; raises the last
    policy's ``InfeasibleBudget`` (with every policy's smallest budget) when none fits."""
    from unsloth_fx.memory.schedule import InfeasibleBudget

    tried: list[dict[str, Any]] = []
    last: InfeasibleBudget | None = None
    # first without offload: a tier that fits only by offloading whatever can be offloaded makes a slow
    # step, so a less precise tier that fits with the time-optimal plans wins; offload counts only when
    # no tier fits without it (and when plan_memory may offload)
    passes = [False, True] if check_kw.get("offload", True) else [False]
    for offload in passes:
        for spec, sp, hp, why in TIER_LADDER:
            try:
                chk = check_budget(model, target_vram, optimizer=spec, **{**check_kw, "offload": offload})
            except InfeasibleBudget as e:
                tried.append({"policy": spec, "offload": offload, "smallest_feasible": e.smallest_feasible,
                              "fits": False})
                last = e
                continue
            need = chk.smallest_feasible if chk.smallest_feasible is not None else chk.static_peak
            tried.append({"policy": spec, "offload": offload, "smallest_feasible": need, "fits": True})
            return {"chosen": spec, "state_precision": sp, "high_precision_tier": hp,
                    "why": why + ("" if not offload else "; fits only with offload counted (no tier fits "
                                  "without it): the plan may offload every activation it can"),
                    "smallest_feasible": need, "budget": chk.budget, "tried": tried}
    assert last is not None
    listing = ", ".join(f"{t['policy']}{' with offload' if t['offload'] else ''} "
                        f"{format_bytes(t['smallest_feasible'])}" for t in tried)
    raise InfeasibleBudget(f"{last}. No HybridAdamW state policy fits; smallest feasible budget per policy "
                           f"(most precise first): {listing}", smallest_feasible=min(
                               t["smallest_feasible"] for t in tried), breakdown=last.breakdown)


def env_options() -> dict[str, str]:
    """The ``UNSLOTH_FX_*`` variables set now (how backend options reach a compile we do not call)."""
    return {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_FX_")}
