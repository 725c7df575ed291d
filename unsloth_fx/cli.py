"""``unsloth-fx``: plan a model's training-step memory on CPU, inspect a dump, benchmark (GPU).

    unsloth-fx plan --model r1-distill-qwen-1.5b --seq 2048 --budget 12GiB [--batch 1]
                    [--optimizer adamw|adamw-bf16|hybrid|int8|int4] [--high-precision-tier fp32|bf16|int8|int4|hybrid]
                    [--fuse-optimizer] [--chunks N | --no-chunking] [--no-chunk-mlp] [--lower inductor|eager] [--json] [--out DIR]
    unsloth-fx inspect DUMP_DIR
    unsloth-fx bench        the benchmark suite (GPU; --smoke runs on CPU)

``plan`` traces on fake tensors (no GPU, no weights) and exits 0 when the step
fits the budget, 3 when the budget is infeasible (the message gives the
breakdown and the smallest feasible budget), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from typing import Any

GPU_80GB = 80 * 10**9  # an "80 GB" card (H100/A100 80GB): 80e9 bytes as sold


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_plan(a: argparse.Namespace) -> int:
    import torch

    from unsloth_fx.memory import report, whole
    from unsloth_fx.memory.model import HYBRID_TIERS, parse_optimizer
    from unsloth_fx.options import OptionError, format_bytes, parse_bytes
    from unsloth_fx.passes.plan_memory import CUDA_WORKSPACE_RESERVE

    try:
        budget = parse_bytes(a.budget) if a.budget else None
    except OptionError as e:
        _say(f"error: {e}")
        return 2
    if isinstance(budget, float):
        _say(f"error: --budget {a.budget!r} is a fraction of device memory; the CLI has no device: give bytes, e.g. 7GiB")
        return 2
    dtype = getattr(torch, a.dtype)
    spec = a.optimizer
    if a.high_precision_tier:
        if a.optimizer not in HYBRID_TIERS:
            _say(f"error: --high-precision-tier is a HybridAdamW setting; --optimizer {a.optimizer} is a torch "
                 f"optimizer (use one of {', '.join(t for t in HYBRID_TIERS if t in ('hybrid', 'int8', 'int4'))})")
            return 2
        spec = f"{a.optimizer}/{a.high_precision_tier}"
    try:
        parse_optimizer(spec)
    except ValueError as e:
        _say(f"error: {e}")
        return 2
    if a.fuse_optimizer and a.optimizer not in HYBRID_TIERS:
        _say(f"error: --fuse-optimizer needs a HybridAdamW tier (hybrid, int8, int4); --optimizer {a.optimizer} "
             "is a torch optimizer, which the fused update does not run")
        return 2
    chunks = None if a.no_chunking else a.chunks
    # plan_memory reserves the CUDA library workspaces on a GPU (no graph node makes them): so does the CLI
    workspace = CUDA_WORKSPACE_RESERVE if a.device == "cuda" else 0
    t0 = time.perf_counter()
    progress = None if a.quiet else _say
    if progress:
        progress(f"planning {a.model} batch={a.batch} seq={a.seq} ({a.dtype}, optimizer={spec}"
                 f"{', fused into backward' if a.fuse_optimizer else ''}"
                 f"{f', {chunks} token chunks' if chunks else ', no chunking'}"
                 f"{' (LM head + CE only)' if chunks and a.no_chunk_mlp else ''}, lower={a.lower}) on fake tensors")
    try:
        est = whole.estimate(a.model, batch=a.batch, seq=a.seq, dtype=dtype, optimizer=spec,
                             fuse_optimizer=a.fuse_optimizer, budget=budget, full=a.full_trace, progress=progress,
                             chunks=chunks, lower=a.lower, workspace=workspace, chunk_mlp=not a.no_chunk_mlp)
    except ValueError as e:
        _say(f"error: {e}")
        return 2
    st = est.static
    fits = budget is None or est.feasible_min <= budget
    largest = None
    if budget is not None and not a.no_seq_search:
        if progress:
            progress("searching the largest sequence length that fits (bisection over traced lengths)")
        largest = whole.largest_seq(a.model, budget, batch=a.batch, dtype=dtype, optimizer=spec,
                                    fuse_optimizer=a.fuse_optimizer, start=a.seq, progress=progress, chunks=chunks,
                                    lower=a.lower, workspace=workspace, chunk_mlp=not a.no_chunk_mlp)
    plan = est.plan
    decisions: dict[str, int] = {}
    if plan is not None:
        for d in plan.decisions.values():
            decisions[d] = decisions.get(d, 0) + 1
    overhead = plan.overhead_s * est.scale if plan else 0.0
    step_s = (plan.step_s if plan else 0.0) * est.scale
    static_total = st.parameters + st.buffers + st.gradients + st.optimizer_state + st.workspace + st.block_slack
    gpu_short = max(est.feasible_min - GPU_80GB, 0)
    doc: dict[str, Any] = {
        "model": a.model, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "optimizer": spec,
        "fuse_optimizer": a.fuse_optimizer, "chunks": chunks, "chunk_mlp": bool(chunks) and not a.no_chunk_mlp,
        "lower": a.lower, "chunking_credited": est.chunking,
        "assumptions": est.assumptions, "budget": budget,
        "static": {"parameters": st.parameters + st.buffers, "gradients": st.gradients,
                   "optimizer_state": st.optimizer_state, "optimizer_state_by_tier": st.state_by_tier,
                   "optimizer_step_temp": st.optimizer_temp, "inputs": st.inputs, "workspace": st.workspace,
                   "block_slack": st.block_slack, "total": static_total},
        "peak_floor": _floor_terms(est),
        "activation_peak": est.activations, "minimum_activations": est.min_activations,
        "predicted_peak": est.base_peak, "smallest_feasible_budget": est.feasible_min,
        "feasible": fits, "modified": bool(plan and plan.modified),
        "decisions": decisions, "decisions_scope": "traced layers" if est.extrapolated else "whole model",
        "estimated_overhead_s": overhead, "estimated_step_s": step_s,
        # matmul + attention FLOPs (schedule.node_flops) of a whole-model plan; None when layers are extrapolated
        # (the LM head and embeddings do not scale with the layer count)
        "step_flops": plan.step_flops if plan and not est.extrapolated else None,
        "recompute_flops": plan.recompute_flops if plan and not est.extrapolated else None,
        "largest_seq_that_fits": largest, "extrapolated": est.extrapolated, "traced_layers": est.traced,
        "unavailable": plan.unavailable if plan else {}, "warnings": est.warnings + (plan.warnings if plan else []),
        "one_80GB_gpu": {"fits": gpu_short == 0, "short_by": gpu_short},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        lines = [f"{a.model} batch={a.batch} seq={a.seq}", f"predicted peak {format_bytes(est.base_peak)}",
                 f"smallest feasible budget {format_bytes(est.feasible_min)}"]
        files = report.artifacts(est.timeline, budget=budget, feasible=fits, decisions=plan.decisions if plan else {},
                                 summary=doc, title=f"{a.model} memory schedule ("
                                 + ("traced layers only" if est.extrapolated else "whole model") + ")",
                                 summary_lines=lines)
        for name, payload in files.items():
            with open(os.path.join(a.out, name), "wb" if isinstance(payload, bytes) else "w") as f:
                f.write(payload)
        doc["files"] = sorted(os.path.join(a.out, n) for n in files)
    if a.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        fb = format_bytes
        print(f"{a.model}: batch {a.batch} x seq {a.seq}, {a.dtype}, optimizer {spec}"
              + (" (fused into backward)" if a.fuse_optimizer else ""))
        print("  assumes: " + "\n           ".join(est.assumptions))
        print(f"  parameters        {fb(st.parameters + st.buffers)}")
        print(f"  gradients         {fb(st.gradients)}" + (" (fused: each freed by its update in backward)"
                                                           if a.fuse_optimizer else ""))
        print(f"  optimizer state   {fb(st.optimizer_state)}"
              + (" (" + ", ".join(f"{k} {fb(v)}" for k, v in sorted(st.state_by_tier.items(), key=lambda kv: -kv[1]))
                 + ")" if len(st.state_by_tier) > 1 else "")
              + (f" (+ {fb(st.optimizer_temp)} " + ("largest gradient + its update's temporaries)"
                                                   if a.fuse_optimizer else "temporaries in step())")))
        if st.workspace:
            print(f"  CUDA workspaces   {fb(st.workspace)} (cuBLAS / cuBLASLt, reserved as plan_memory does on a GPU)")
        if st.block_slack:
            print(f"  block slack       {fb(st.block_slack)} (caching allocator blocks beyond the parameters and state)")
        print(f"  static total      {fb(static_total)}")
        print(f"  activation peak   {fb(est.activations)} (minimum with recompute: {fb(est.min_activations)})"
              + ("  [extrapolated from traced layers " + str(est.traced) + "]" if est.extrapolated else ""))
        print(f"  predicted peak    {fb(est.base_peak)}; smallest feasible budget {fb(est.feasible_min)}")
        floor = doc["peak_floor"]
        print("  smallest peak     " + " + ".join(f"{k} {fb(v)}" for k, v in floor.items() if k != "total")
              + f" = {fb(floor['total'])}")
        if budget is not None:
            if not fits:
                print(f"  budget {fb(budget)}: INFEASIBLE: " + " + ".join(f"{k} {fb(v)}" for k, v in floor.items()
                                                                         if k != "total")
                      + f" = {fb(est.feasible_min)}; smallest feasible budget {fb(est.feasible_min)}")
            elif plan is None:
                print(f"  budget {fb(budget)}: fits without changes")
            else:
                print(f"  budget {fb(budget)}: fits; decisions ({doc['decisions_scope']}): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())))
                what = "recompute and exposed host transfers" if decisions.get("offload") else "recompute"
                print(f"  estimated overhead {overhead * 1e3:.1f} ms per step ({what}) over ~{step_s * 1e3:.1f} ms")
                sf, rf = doc["step_flops"], doc["recompute_flops"]
                if sf:  # a whole-model plan (see the JSON's step_flops)
                    print(f"  {plan.flops_line()}: at an equal FLOP rate, at most {sf / (sf + rf):.3f}x the tokens/s "
                          "of the step without it")
            print("  largest seq that fits: " + ("not searched (--no-seq-search)" if a.no_seq_search
                                                  else str(largest) if largest else "none"))
            if plan:
                print("  unavailable decisions: " + "; ".join(f"{k} ({v})" for k, v in plan.unavailable.items()))
        if gpu_short:
            print(f"  one 80 GB GPU cannot hold this step: it needs at least {fb(est.feasible_min)} "
                  f"({est.feasible_min / 1e9:.0f} GB), {fb(gpu_short)} ({gpu_short / 1e9:.0f} GB) more than 80 GB; "
                  f"the parameters alone are {fb(st.parameters)} ({st.parameters / 1e9:.0f} GB)")
        for w in doc["warnings"]:
            print(f"  warning: {w}")
        if a.out:
            print(f"  wrote {', '.join(doc['files'])}")
    if a.world_size and not a.json:
        from unsloth_fx.distributed import format_plan

        print(f"\nFSDP2 over {a.world_size} GPUs (static bytes per GPU; activations not included):")
        print(format_plan(a.model, world_size=a.world_size))
    if budget is not None and not fits:
        if a.json:
            return 3
        _say(f"error: memory_budget={format_bytes(budget)} is infeasible for {a.model}; smallest feasible budget "
             f"{format_bytes(est.feasible_min)}"
             + (" (extrapolated from traced layers, without offload; --full-trace traces every layer and counts "
                "offload, which can lower it)" if est.extrapolated else ""))
        return 3
    return 0


def _floor_terms(est: Any) -> dict[str, int]:
    """The smallest feasible peak as a sum of named terms (bytes) that add up exactly: either
    the resident bytes plus the activations and in-flight gradients at the minimum plan's
    peak, or (when larger) the optimizer step's: parameters, gradients, state, temporaries."""
    st = est.static
    ws = {"CUDA library workspaces": st.workspace} if st.workspace else {}
    if st.block_slack:
        ws["allocator block slack"] = st.block_slack
    if est.min_peak > est.optimizer_peak:
        return {"parameters": st.parameters + st.buffers, "optimizer state": st.optimizer_state,
                "inputs": st.inputs, **ws, "activations + in-flight gradients (minimum plan)": est.min_peak - st.resident,
                "total": est.min_peak}
    return {"parameters": st.parameters + st.buffers, "gradients": st.gradients, "optimizer state": st.optimizer_state,
            "inputs": st.inputs, **ws, ("largest gradient + its update" if st.fuse_optimizer else
                                        "optimizer-step temporaries"): st.optimizer_temp, "total": est.optimizer_peak}


def cmd_inspect(a: argparse.Namespace) -> int:
    root = a.dump
    if not os.path.isdir(root):
        _say(f"error: {root!r} is not a dump directory")
        return 2
    graphs = sorted(d for d in os.listdir(root) if d.startswith("graph_") and os.path.isdir(os.path.join(root, d)))
    if not graphs and os.path.exists(os.path.join(root, "pipeline.txt")):
        graphs, root = [os.path.basename(root)], os.path.dirname(root) or "."
    if not graphs:
        _say(f"error: no graph_* folders in {root!r}")
        return 2
    rows = []
    for g in graphs:
        d = os.path.join(root, g)
        files = sorted(os.listdir(d))
        pipeline = open(os.path.join(d, "pipeline.txt")).read().splitlines() if "pipeline.txt" in files else []
        stats = json.load(open(os.path.join(d, "pass_stats.json"))) if "pass_stats.json" in files else {}
        sched = None
        if "memory_schedule.json" in files:
            sj = json.load(open(os.path.join(d, "memory_schedule.json")))
            sched = {k: sj.get(k) for k in ("predicted_peak", "budget", "feasible", "saved_bytes")}
        rows.append({"graph": g, "pipeline": pipeline[0] if pipeline else "", "passes": [p for p in pipeline[2:] if p],
                     "stats": stats, "schedule": sched, "files": files})
        print(f"{g}: pipeline {rows[-1]['pipeline']!r}, {len(files)} files")
        for stage, passes in stats.items():
            for name, st in passes.items():
                keep = {k: v for k, v in st.items() if not isinstance(v, (dict, list))}
                print(f"  {stage}:{name} " + ", ".join(f"{k}={v}" for k, v in keep.items()))
        if sched:
            print(f"  memory: {sched}")
    body = []
    for r in rows:
        body.append(f"<h2>{html.escape(r['graph'])}</h2><p>pipeline <code>{html.escape(r['pipeline'])}</code></p>"
                    "<table border=1 cellpadding=3><tr><th>stage:pass</th><th>stats</th></tr>")
        for stage, passes in r["stats"].items():
            for name, st in passes.items():
                body.append(f"<tr><td>{html.escape(stage)}:{html.escape(name)}</td>"
                            f"<td><code>{html.escape(json.dumps(st, default=str))}</code></td></tr>")
        body.append("</table>")
        if "memory_schedule.html" in r["files"]:
            body.append(f"<p><a href='{html.escape(r['graph'])}/memory_schedule.html'>memory schedule</a></p>")
        body.append("<p>files: " + ", ".join(f"<a href='{html.escape(r['graph'])}/{html.escape(f)}'>{html.escape(f)}</a>"
                                              for f in r["files"]) + "</p>")
    out = os.path.join(root, "report.html")
    with open(out, "w") as f:
        f.write("<!DOCTYPE html><html><head><meta charset='utf-8'><title>unsloth-fx dump</title></head><body>"
                + "".join(body) + "</body></html>\n")
    print(f"wrote {out}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from unsloth_fx.bench import main as bench_main

    return int(bench_main(a.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    from unsloth_fx.memory.model import OPTIMIZER_STATE
    from unsloth_fx.runtime.adamw import TIERS

    ap = argparse.ArgumentParser(prog="unsloth-fx", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="predict and plan a training step's memory on CPU (fake tensors)")
    p.add_argument("--model", required=True, help="a zoo name, e.g. r1-distill-qwen-1.5b or deepseek-r1")
    p.add_argument("--seq", type=int, required=True, help="sequence length (tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", default=None, help="device memory budget, e.g. 7GiB or 12e9")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATE),
                   help="adamw / adamw-bf16 / sgd: torch optimizers; hybrid / int8 / int4 / fp32 / bf16: HybridAdamW's "
                        "state_precision, counted per parameter with its own tier policy")
    p.add_argument("--high-precision-tier", default=None, choices=list(TIERS),
                   help="HybridAdamW's tier for embeddings / LM head (default fp32; norms, biases stay fp32)")
    p.add_argument("--fuse-optimizer", action="store_true",
                   help="HybridAdamW update inside backward: each gradient freed by its update (no gradient buffers)")
    p.add_argument("--chunks", type=int, default=8,
                   help="trace with apply_optimizations' chunking passes (chunked LM head + CE, token-chunked "
                        "MLPs) at this many chunks (default 8, as apply_optimizations)")
    p.add_argument("--no-chunking", action="store_true", help="trace the model unchunked")
    p.add_argument("--no-chunk-mlp", action="store_true",
                   help="chunk the LM head + CE only, not the MLPs (what apply_optimizations picks when that fits "
                        "without offload)")
    p.add_argument("--lower", default="inductor", choices=["inductor", "eager"],
                   help="the backend's lowering to model (default inductor, the backend's default: Inductor's "
                        "decompositions, its fused pointwise chains not materialized; eager: every node materialized)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="the device the step will run on (default cuda: reserve the 64 MiB of CUDA library "
                        "workspaces that plan_memory reserves on a GPU; cpu: none)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--full-trace", action="store_true", help="trace every layer instead of extrapolating")
    p.add_argument("--no-seq-search", action="store_true", help="skip the largest-sequence search")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="write memory_schedule.{json,html,png} here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--world-size", type=int, default=None,
                   help="also print the FSDP2 per-GPU static memory and the GPUs needed per optimizer tier")
    p.set_defaults(fn=cmd_plan)
    i = sub.add_parser("inspect", help="summarize a dump folder and write report.html")
    i.add_argument("dump")
    i.set_defaults(fn=cmd_inspect)
    b = sub.add_parser("bench", help="GPU benchmark suite (see `unsloth-fx bench --help`)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the suite parses its own flags, --help included
        from unsloth_fx.bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.cmd == "plan" and (args.seq <= 0 or args.batch <= 0):
        _say("error: --seq and --batch must be positive")
        return 2
    if args.cmd == "plan" and args.chunks < 1 and not args.no_chunking:
        _say("error: --chunks must be >= 1 (or --no-chunking)")
        return 2
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
