"""GPU validation of the memory model and scheduler (issue 3).

r1-distill-qwen-1.5b, bf16 weights, batch 1, each cell in its own subprocess
(``--jobs N`` compile at once; the timed steps hold the UFX_BENCH_LOCK file lock,
benchmarks/_lock.py, so no two cells time at once). Modes:

* ``ours-apply`` (the product path): ``unsloth_fx.apply_optimizations(model,
  target_vram=B, optimizer="hybrid_adam", seq_len=S)``: it picks HybridAdamW's state
  tier (the ladder), fuses the update into backward, chunks when the unchunked step
  does not fit, and compiles with ``backend="unsloth"``.
* ``stock``: ``torch.compile(model)`` (Inductor), torch AdamW.
* ``torch-budget``: stock compile with ``torch._functorch.config.activation_memory_budget``
  = each of ``--ambs`` (torch's own recompute knob), torch AdamW.
* ``ours`` (the first issue-3 run, kept for comparison): ``backend="unsloth"`` with
  ``plan_memory{optimizer=adamw-bf16}`` and stock foreach AdamW (bf16 moments: 16.55 GiB
  before any activation, so 8 / 12 / 16 GiB are refused by design).

Torch AdamW is ``fused=True`` (``--torch-adamw``; no foreach ``sqrt(v)`` temporaries,
what a user short of memory would pick), except when the legacy ``ours`` mode runs:
then foreach, which is what its planner key ``adamw-bf16`` counts.

Recorded per cell (bytes, seconds):

* ``predicted_peak``: the compiled graph's plan (``plan_memory`` stats of the last
  compiled graph, ``unsloth_fx.backend.LAST``); ``check_predicted_peak`` /
  ``check_smallest_feasible``: apply_optimizations' before-training check
  (``ufx_report["check"]``); ``tier`` (``ufx_report["optimizer_policy"]``), ``chunks``
  (0: unchunked), ``fuse_optimizer``; recompute / offload counts of the plan.
* ``measured_peak``: ``torch.cuda.max_memory_allocated`` over the ``--steps`` timed
  steps, after a warm-up step and ``reset_peak_memory_stats``;
  ``measured_peak_all``: over every step, the first (compiling) one included
  (``measured_peak_first``: the first step alone); ``measured_reserved``:
  ``max_memory_reserved`` of the timed steps; ``over_budget``: ``measured_peak_all`` > B.
* ``tokens_per_s``: timed tokens / timed seconds.
* ``refused`` (the planner's message) and ``refused_at`` ("check": apply_optimizations
  refused before compiling; "compile": plan_memory refused the compiled graph).

Tables printed: every cell; each ours-apply cell beside the torch cell (stock or
torch-budget) of the same seq with the nearest ``measured_peak_all`` ("at equal
measured memory": the gap is printed, it is rarely zero); the offload pair.

    python benchmarks/bench_memory.py --jobs 6 --out bench_memory.json     # GPU, the issue's grid
    python benchmarks/bench_memory.py --jobs 6 --offload-cell --out bench_memory.json
    python benchmarks/bench_memory.py --dry-run      # CPU: each ours-apply cell's tier / chunks / refusal, no GPU
    python benchmarks/bench_memory.py --smoke        # CPU, tiny-qwen2, eager lowering (no GPU numbers)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lock import parallel_map, timed_section  # noqa: E402

GiB = 2**30
MODEL = "r1-distill-qwen-1.5b"
TORCH_MODES = ("stock", "torch-budget")

# The offload cell (--offload-cell), found with the CPU planner (docs/memory.md, "GPU validation"):
#   unsloth-fx plan --model r1-distill-qwen-1.5b --seq 4096 --budget 9GiB --optimizer hybrid \
#       --high-precision-tier int4 --fuse-optimizer --no-seq-search --json
# plans the traced layers with 24 offloads, 201 recomputes, 72 saves (at 9e6920e). The tier is fixed to that run's
# (the ladder would pick int8/int8 at 9 GiB); chunks as apply_optimizations' default (8). Two cells,
# identical pipelines but for plan_memory's `offload` switch (`plan`: plan_memory options).
OFFLOAD_CELL = {"seq": 4096, "budget_gib": 9.0, "chunks": 8, "plan": {},
                "optimizer_options": {"state_precision": "hybrid", "high_precision_tier": "int4"}}

# Seconds per cell for the run-time estimate (H100 host, 16 cores, several cells compiling at once):
# process start + model build, the product path's before-training check (it traces 1- and 2-layer
# variants on meta, unchunked and chunked), the compile (~60-90 s for the 1.5B, more with our passes'
# planning of the full graph), one step. Rough: the estimate is printed to decide the grid, not reported.
COST_S = {"start": 20.0, "check": 35.0, "compile_torch": 80.0, "compile_ours": 110.0, "step": 0.6}


# ----------------------------------------------------------------------------- one cell (one process)


def _refusal(e: BaseException) -> str | None:
    """The planner's refusal message in ``e`` (InfeasibleBudget, possibly wrapped by Dynamo), else None."""
    from unsloth_fx.memory.schedule import InfeasibleBudget

    seen = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, InfeasibleBudget):
            return str(x)
        x = x.__cause__ or x.__context__
    msg = str(e)
    if "infeasible" in msg:
        starts = [i for i in (msg.find("memory_budget="), msg.find("target_vram=")) if i >= 0]
        return msg[min(starts):] if starts else msg
    return None


def _chunks_of(pipeline: str) -> int:
    m = re.search(r"split_token_chunks\{chunks=(\d+)\}", pipeline or "")
    return int(m.group(1)) if m else 0


def _product_pipeline(plan: dict[str, Any], chunks: int) -> str:
    """apply_optimizations' own pipeline with plan_memory options added (naming a pass again
    replaces its options, so the optimizer placeholder is repeated)."""
    from unsloth_fx.memory.whole import chunk_passes

    opts = "".join(f",{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in plan.items())
    pipe = "default,plan_memory{optimizer={OPTIMIZER}" + opts + "}"
    return pipe + "".join(",+" + p for p in chunk_passes(chunks)) if chunks else pipe


def run_cell(model: str, seq: int, budget: int | None, mode: str, device: str, lower: str, steps: int,
             amb: float | None = None, torch_adamw: str = "foreach", plan: dict[str, Any] | None = None,
             chunks: int | None = None, optimizer_options: dict[str, Any] | None = None,
             tag: str = "") -> dict[str, Any]:
    """Build, compile and time one cell in this process; returns its record (never raises for a
    refusal or a failed step: ``refused`` / ``error``). ``plan`` / ``chunks`` (ours-apply only): an
    explicit pipeline with these plan_memory options and chunk count, instead of apply_optimizations'
    automatic one (the offload cell); ``optimizer_options``: HybridAdamW's, fixing its tier (no ladder)."""
    import torch

    import unsloth_fx.backend as backend
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if (cuda or mode == "ours-apply") else torch.float32
    m = build_model(model, device=device, dtype=dtype)
    m.config.use_cache = False
    m.train()
    out: dict[str, Any] = {"model": model, "seq": seq, "budget": budget, "mode": mode, "tag": tag}
    if mode == "torch-budget":
        out["amb"] = amb if amb is not None else 0.5
    if mode in TORCH_MODES:
        out["torch_adamw"] = torch_adamw
    backend.LAST.clear()
    if mode == "ours-apply":
        from unsloth_fx.api import apply_optimizations
        from unsloth_fx.memory.schedule import InfeasibleBudget

        kw: dict[str, Any] = {} if lower == "inductor" else {"lower": lower}
        if plan is not None or chunks is not None:
            if chunks:
                from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

                patch_causal_lm(m)  # what apply_optimizations does when it adds the chunk passes itself
            kw.update(pipeline=_product_pipeline(plan or {}, chunks or 0), chunks=chunks or 8)
            out["plan_options"] = dict(plan or {})
        if optimizer_options:
            kw["optimizer_options"] = dict(optimizer_options)
        try:
            f, opt = apply_optimizations(m, target_vram=budget, optimizer="hybrid_adam", seq_len=seq, **kw)
        except InfeasibleBudget as e:
            out.update(refused=str(e), refused_at="check")
            return out
        rep = f.ufx_report
        pol = rep.get("optimizer_policy") or {}
        chk = rep.get("check") or {}
        out.update(tier=pol.get("chosen"), tiers_tried=pol.get("tried"), chunks=_chunks_of(rep["options"]["pipeline"]),
                   fuse_optimizer=rep["options"].get("fuse_optimizer"), pipeline=rep["options"]["pipeline"],
                   check_predicted_peak=chk.get("predicted_peak"), check_smallest_feasible=chk.get("smallest_feasible"),
                   check_notes=chk.get("notes"))
    else:
        fused = torch_adamw == "fused" and cuda
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=fused or None)
        if mode == "ours":
            # plan_memory{optimizer=...} makes the model count torch AdamW's bf16 moments (+ foreach temporaries)
            optname = "adamw-bf16" if dtype == torch.bfloat16 else "adamw"
            opts: dict[str, Any] = {"lower": lower, "pipeline": f"default,plan_memory{{optimizer={optname}}}"}
            if budget:
                opts["memory_budget"] = budget
            f = torch.compile(m, backend="unsloth", options=opts)
        else:
            f = torch.compile(m) if cuda else torch.compile(m, backend="aot_eager")
    ids = torch.randint(0, m.config.vocab_size, (1, seq), device=device)

    def step():
        loss = f(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()  # a no-op for updates fused into backward
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    amb_before = None
    if mode == "torch-budget":
        import torch._functorch.config as fc  # stock torch's knob: set it as a user would

        # Process-wide and read by the lazy compile (the first step), so it stays set through the steps and is
        # put back when the cell ends (finally below): a caller running cells in its process keeps its own.
        amb_before, fc.activation_memory_budget = fc.activation_memory_budget, out["amb"]
    try:
        if cuda:
            sync()
            out["resident_before"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step()  # compiles; may overlap another cell's timing (see benchmarks/_lock.py)
        sync()
        if cuda:
            out["measured_peak_first"] = torch.cuda.max_memory_allocated()
        with timed_section():
            step()  # warm-up
            sync()
            peak_warm = torch.cuda.max_memory_allocated() if cuda else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(steps):
                loss = step()
            out["loss"] = float(loss.detach())  # syncs
            sync()
            dt = time.perf_counter() - t
            if cuda:
                out["measured_peak"] = torch.cuda.max_memory_allocated()
                out["measured_reserved"] = torch.cuda.max_memory_reserved()
                out["measured_peak_all"] = max(peak_warm, out["measured_peak"])
        out["tokens_per_s"] = steps * seq / dt
    except Exception as e:  # noqa: BLE001 - report, do not crash the table
        why = _refusal(e)
        if why is not None:
            out.update(refused=why, refused_at="compile")
        else:
            oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
            out["error"] = ("OOM: " if oom else "") + f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        if amb_before is not None:
            fc.activation_memory_budget = amb_before
    ctx = backend.LAST.get("ctx")
    stats = ctx.stats.get("joint", {}).get("plan_memory", {}) if ctx is not None else {}
    if stats:
        out.update(predicted_peak=stats.get("predicted_peak"), baseline_peak=stats.get("baseline_peak"),
                   feasible=stats.get("feasible"), recompute=stats.get("recompute"), offload=stats.get("offload"),
                   offloaded_bytes=stats.get("offloaded_bytes"), overhead_s=stats.get("overhead_s"))
    if out.get("predicted_peak") and out.get("measured_peak"):
        out["error_pct"] = 100.0 * (out["predicted_peak"] - out["measured_peak"]) / out["measured_peak"]
    if budget and out.get("measured_peak_all") is not None:
        out["over_budget"] = out["measured_peak_all"] > budget
        out["over_budget_by"] = max(out["measured_peak_all"] - budget, 0)
    return out


def dry_run_cell(model: str, seq: int, budget: int) -> dict[str, Any]:
    """What ``ours-apply`` would choose, on CPU with the model on meta: apply_optimizations'
    checks run (they trace on meta), the compile is lazy and never runs. No memory is measured."""
    import torch

    from unsloth_fx.api import apply_optimizations
    from unsloth_fx.memory.schedule import InfeasibleBudget
    from unsloth_fx.zoo import build_model

    m = build_model(model, device="meta", dtype=torch.bfloat16)
    m.config.use_cache = False
    out: dict[str, Any] = {"model": model, "seq": seq, "budget": budget, "mode": "ours-apply", "tag": "dry-run"}
    t = time.perf_counter()
    try:
        f, _ = apply_optimizations(m, target_vram=budget, optimizer="hybrid_adam", seq_len=seq)
        rep = f.ufx_report
        out.update(tier=rep["optimizer_policy"].get("chosen"), tiers_tried=rep["optimizer_policy"].get("tried"),
                   chunks=_chunks_of(rep["options"]["pipeline"]), fuse_optimizer=rep["options"]["fuse_optimizer"],
                   check_predicted_peak=rep["check"]["predicted_peak"],
                   check_smallest_feasible=rep["check"]["smallest_feasible"], check_notes=rep["check"]["notes"])
    except InfeasibleBudget as e:
        out.update(refused=str(e), refused_at="check")
    out["check_s"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------- the grid, the estimate, the tables


def build_cells(*, model: str, device: str, lower: str, seqs: list[int], budgets: list[int | None], modes: list[str],
                ambs: list[float], steps: int, torch_adamw: str, offload_cell: dict[str, Any] | None) -> list[dict]:
    """The cells in run order: per seq the torch cells, then ours-apply per budget, then legacy ours;
    the offload pair last."""
    base = dict(model=model, device=device, lower=lower, steps=steps)
    cells: list[dict[str, Any]] = []
    for seq in seqs:
        if "stock" in modes:
            cells.append(dict(base, seq=seq, budget=None, mode="stock", torch_adamw=torch_adamw))
        if "torch-budget" in modes:
            cells += [dict(base, seq=seq, budget=None, mode="torch-budget", amb=a, torch_adamw=torch_adamw)
                      for a in ambs]
        for mode in ("ours-apply", "ours"):
            if mode in modes:
                cells += [dict(base, seq=seq, budget=b, mode=mode) for b in budgets]
    if offload_cell:
        b = offload_cell["budget"]
        for on in (True, False):
            cells.append(dict(base, seq=offload_cell["seq"], budget=b, mode="ours-apply", chunks=offload_cell["chunks"],
                              plan={**offload_cell["plan"], "offload": on}, tag="offload" if on else "no-offload",
                              **({"optimizer_options": offload_cell["optimizer_options"]}
                                 if offload_cell.get("optimizer_options") else {})))
    return cells


def estimate_seconds(cells: list[dict], jobs: int, cost: dict[str, float] | None = None) -> float:
    """Wall seconds the grid should take: cells scheduled longest-first onto ``jobs`` workers
    (compiles in parallel), then the timed steps, which the lock serializes, added in full."""
    c = cost or COST_S
    busy, timed = [], 0.0
    for cell in cells:
        ours = cell["mode"] in ("ours-apply", "ours")
        busy.append(c["start"] + (c["check"] if cell["mode"] == "ours-apply" else 0.0)
                    + (c["compile_ours"] if ours else c["compile_torch"]) + c["step"])
        timed += (1 + cell["steps"]) * c["step"]
    lanes = [0.0] * max(jobs, 1)
    for b in sorted(busy, reverse=True):
        i = lanes.index(min(lanes))
        lanes[i] += b
    return max(lanes) + timed


def _peak(r: dict) -> int | None:
    return r.get("measured_peak_all") or r.get("measured_peak")


def pair_with_torch(results: list[dict]) -> list[dict]:
    """Each ours-apply cell (not the offload pair) that measured a peak, beside the torch cell
    (stock or torch-budget) of the same seq whose measured peak (``measured_peak_all``) is nearest;
    ties go to the lower-memory torch cell, then to the earlier one. Refused ours cells are listed
    with no partner. Returns [{"ours", "torch" (or None), "gap" (torch - ours bytes), "speedup"
    (ours / torch tokens/s)}] in the order of ``results``."""
    rows = []
    for r in results:
        if r.get("mode") != "ours-apply" or r.get("tag") in ("offload", "no-offload"):
            continue
        row: dict[str, Any] = {"ours": r, "torch": None, "gap": None, "speedup": None}
        p = _peak(r)
        cands = [t for t in results if t.get("mode") in TORCH_MODES and t.get("seq") == r.get("seq") and _peak(t)]
        if p is not None and cands:
            t = min(cands, key=lambda t: (abs(_peak(t) - p), _peak(t), results.index(t)))
            row.update(torch=t, gap=_peak(t) - p)
            if r.get("tokens_per_s") and t.get("tokens_per_s"):
                row["speedup"] = r["tokens_per_s"] / t["tokens_per_s"]
        rows.append(row)
    return rows


def _g(v: Any) -> str:
    return f"{v / GiB:.2f}" if isinstance(v, (int, float)) and v else "-"


def _label(r: dict) -> str:
    if r.get("mode") == "torch-budget":
        return f"torch amb={r.get('amb')}"
    if r.get("tag"):
        return f"{r['mode']} ({r['tag']})"
    return r["mode"]


def _note(r: dict) -> str:
    if r.get("refused"):
        return f"refused at {r.get('refused_at')}: {r['refused']}"
    if r.get("error"):
        return r["error"]
    bits = []
    if r.get("recompute"):
        bits.append(f"recompute {r['recompute']}")
    if r.get("offload"):
        bits.append(f"offload {r['offload']} ({_g(r.get('offloaded_bytes'))} GiB)")
    if r.get("over_budget"):
        bits.append(f"OVER BUDGET by {r['over_budget_by'] / 2**20:.1f} MiB")
    return ", ".join(bits)


def tables(results: list[dict]) -> str:
    """The markdown the script prints: every cell, the pairing, the offload pair."""
    L = ["| mode | seq | budget GiB | tier | chunks | predicted GiB | measured GiB (timed) | measured GiB (all steps) "
         "| predicted - measured | tokens/s | note |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        err = f"{r['error_pct']:+.1f}%" if r.get("error_pct") is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        chunks = str(r["chunks"]) if r.get("chunks") is not None else "-"
        L.append(f"| {_label(r)} | {r['seq']} | {_g(r.get('budget'))} | {r.get('tier') or '-'} | {chunks} | "
                 f"{_g(r.get('predicted_peak'))} | {_g(r.get('measured_peak'))} | {_g(r.get('measured_peak_all'))} | "
                 f"{err} | {tps} | {_note(r)[:160].replace('|', '/')} |")
    pairs = pair_with_torch(results)
    if pairs:
        L += ["", "ours-apply beside the torch cell of the same seq with the nearest measured peak (all steps):", "",
              "| seq | budget GiB | ours GiB | ours tokens/s | torch cell | torch GiB | torch - ours GiB "
              "| torch tokens/s | ours / torch |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for p in pairs:
            o, t = p["ours"], p["torch"]
            if t is None:
                why = "refused" if o.get("refused") else ("error" if o.get("error") else "no torch cell")
                L.append(f"| {o['seq']} | {_g(o.get('budget'))} | {why} | | | | | | |")
                continue
            L.append(f"| {o['seq']} | {_g(o.get('budget'))} | {_g(_peak(o))} | {o.get('tokens_per_s', 0):,.0f} | "
                     f"{_label(t)} | {_g(_peak(t))} | {p['gap'] / GiB:+.2f} | {t.get('tokens_per_s', 0):,.0f} | "
                     + (f"{p['speedup']:.2f}x |" if p["speedup"] else "- |"))
    off = {r.get("tag"): r for r in results if r.get("tag") in ("offload", "no-offload")}
    if off:
        L += ["", "offload cell (same budget, same pipeline but plan_memory's offload switch):", "",
              "| cell | seq | budget GiB | offloaded tensors | offloaded GiB | recompute | predicted GiB "
              "| measured GiB (all steps) | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in ("offload", "no-offload"):
            r = off.get(k)
            if r is None:
                continue
            tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else (_note(r)[:80] or "-")
            L.append(f"| {k} | {r['seq']} | {_g(r.get('budget'))} | {r.get('offload', '-')} | "
                     f"{_g(r.get('offloaded_bytes'))} | {r.get('recompute', '-')} | {_g(r.get('predicted_peak'))} | "
                     f"{_g(_peak(r))} | {tps} |")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-qwen2, eager lowering (no GPU numbers)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: what each ours-apply cell would choose (tier, chunks, refusal); no compile, no GPU")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one JSON-encoded cell
    ap.add_argument("--steps", type=int, default=3, help="timed steps per cell (after 1 compiling + 1 warm-up)")
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--budgets", default="8,12,16", help="GiB, comma-separated")
    ap.add_argument("--modes", default="stock,torch-budget,ours-apply",
                    help="comma-separated: stock, torch-budget, ours-apply (product path), ours (legacy, torch AdamW); "
                    "none (with --offload-cell: the offload pair alone)")
    ap.add_argument("--ambs", default="0.1,0.3", help="activation_memory_budget values of the torch-budget cells")
    ap.add_argument("--torch-adamw", choices=["fused", "foreach"], default=None,
                    help="torch AdamW of stock / torch-budget / ours (default fused; foreach when 'ours' runs)")
    ap.add_argument("--offload-cell", action="store_true",
                    help=f"add the offload pair: {OFFLOAD_CELL} with plan_memory offload on / off")
    ap.add_argument("--jobs", type=int, default=1, help="cells compiling at once (timing stays serial)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    a = ap.parse_args(argv)
    if a.cell:
        c = json.loads(a.cell)
        print("CELL " + json.dumps(run_cell(**c), default=str))
        return 0
    modes = [m for m in a.modes.split(",") if m and m != "none"]  # none: only the offload pair
    bad = [m for m in modes if m not in (*TORCH_MODES, "ours-apply", "ours")]
    if bad:
        print(f"error: unknown mode(s) {bad}", file=sys.stderr)
        return 2
    torch_adamw = a.torch_adamw or ("foreach" if "ours" in modes else "fused")
    offload = None
    if a.smoke:
        # tiny-qwen2: 64 MiB fits, 64 KiB is refused before any activation (parameters alone are larger)
        model, device, lower, seqs, budgets = "tiny-qwen2", "cpu", "eager", [64], [64 * 2**20, 2**16]
        steps = min(a.steps, 2)
        if a.offload_cell:
            # force_offload=all: on CPU the ops copy; this checks the path and the records, not a GPU budget
            offload = {"seq": 64, "budget": 64 * 2**20, "chunks": 0, "plan": {"force_offload": "all"}}
    else:
        model, device, lower, steps = MODEL, "cuda", "inductor", a.steps
        seqs = [int(x) for x in a.seqs.split(",")]
        budgets = [int(x * GiB) for x in _floats(a.budgets)]
        if a.offload_cell:
            offload = {k: v for k, v in OFFLOAD_CELL.items() if k != "budget_gib"}
            offload["budget"] = int(OFFLOAD_CELL["budget_gib"] * GiB)
    if a.dry_run:
        results = [dry_run_cell(MODEL, s, b) for s in seqs for b in budgets if b]
        print(tables(results), end="")
        with open(a.out, "w") as f:
            json.dump({"device": "meta (dry run)", "results": results}, f, indent=2, default=str)
        return 0
    cells = build_cells(model=model, device=device, lower=lower, seqs=seqs, budgets=budgets, modes=modes,
                        ambs=_floats(a.ambs), steps=steps, torch_adamw=torch_adamw, offload_cell=offload)
    est = estimate_seconds(cells, a.jobs)
    print(f"bench_memory: {len(cells)} cells, --jobs {a.jobs}: estimated {est / 60:.1f} min on an H100 host "
          f"(per cell: {COST_S}; compiles overlap, timed steps are serialized)", file=sys.stderr, flush=True)
    if est > 8 * 60 and not a.smoke:
        print("bench_memory: WARNING: over 8 minutes; a device command may be cut at 10: fewer --ambs / --seqs, "
              "or run --offload-cell alone (--modes none --offload-cell --jobs 2)", file=sys.stderr, flush=True)
    env = {**os.environ}
    if a.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.pop("TRITON_INTERPRET", None)  # HybridAdamW's pure-PyTorch path on CPU; the interpreter is far slower
    partial = a.out + ".partial.jsonl"
    if os.path.exists(partial):
        os.remove(partial)

    def run(c):
        name = f"{c['mode']}{'/' + c.get('tag', '') if c.get('tag') else ''} seq={c['seq']} budget={c['budget']}" \
               + (f" amb={c['amb']}" if c.get("amb") is not None else "")
        print(f"running {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--cell", json.dumps(c)],
                               capture_output=True, text=True, env=env, timeout=a.timeout)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CELL ")), None)
            r = json.loads(line[5:]) if line else {**c, "error": f"no result (exit {p.returncode}): {p.stderr[-400:]}"}
        except subprocess.TimeoutExpired:
            r = {**c, "error": f"timeout after {a.timeout:.0f} s"}
        r["wall_s"] = time.perf_counter() - t0
        print(f"done {name} in {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
        with open(partial, "a") as f:  # each cell as it finishes: a killed run keeps its cells
            f.write(json.dumps(r, default=str) + "\n")
        return r

    results = parallel_map(run, cells, a.jobs)
    with open(a.out, "w") as f:
        json.dump({"device": device, "estimate_s": est, "results": results}, f, indent=2, default=str)
    print(tables(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
