"""Where the measured peak of an ``apply_optimizations`` step is: the tensors alive at that moment.

Builds the model with random weights, compiles it with ``apply_optimizations`` at a budget, runs
warm-up steps, then records the CUDA caching allocator's history (torch's memory snapshot) over
one more step and replays it: the moment of the largest allocated total, and the blocks alive
then, largest first, each with the first frames of the Python stack that allocated it (compiled
code included, with its source line). Blocks allocated before recording (parameters, optimizer
state, library workspaces) count in the baseline and are listed by block size (no stacks were recorded
for them). Says whether the peak is in the forward or the backward (a marker allocation of
``MARK_BYTES`` just before ``loss.backward()`` splits the trace) and which allocation reached it. Prints the
check's all-saved prediction and the compiled plan's predicted peak (``plan_memory``'s stats) beside the
measured one. ``--variant NAME`` builds a suite variant's step instead (``unsloth_fx.bench.VARIANTS``).

    python3 benchmarks/peak_snapshot.py --budget 8GiB --seq 2048            # GPU
    python3 benchmarks/peak_snapshot.py --smoke                              # CPU: the replay logic only
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import sys
from collections import defaultdict
from typing import Any

GiB = 2**30
MiB = 2**20

# frames from these paths say nothing about which tensor it is
_SKIP = ("/torch/", "/contextlib.py", "/functools.py", "/threading.py", "/runpy.py")


def replay(trace: list[dict[str, Any]], baseline: int) -> tuple[int, dict[int, dict[str, Any]], int]:
    """(peak bytes, {addr: alloc event} alive at the peak, index of the peak event) from one device's
    allocator trace (``snapshot["device_traces"][i]``). ``baseline``: bytes allocated when recording
    started. A block counts from ``alloc`` until ``free_completed`` (a ``free_requested`` block whose
    stream uses are pending still holds its memory)."""
    live: dict[int, dict[str, Any]] = {}
    cur = peak = baseline
    peak_live: dict[int, dict[str, Any]] = {}
    peak_at = -1
    for i, ev in enumerate(trace):
        act = ev.get("action")
        if act == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, peak_at = cur, i
                peak_live = dict(live)
        elif act == "free_completed":
            if live.pop(ev["addr"], None) is not None:
                cur -= ev["size"]
    return peak, peak_live, peak_at


def where(ev: dict[str, Any], depth: int = 3) -> str:
    """The first ``depth`` frames of an allocation outside torch's own code, with source lines."""
    out = []
    for f in ev.get("frames") or []:
        fn = f.get("filename", "")
        if any(s in fn for s in _SKIP) or fn.startswith("<") or fn == "??":
            continue
        line = linecache.getline(fn, int(f.get("line", 0))).strip()
        out.append(f"{os.path.basename(fn)}:{f.get('line')} {f.get('name')}: {line[:90]}")
        if len(out) == depth:
            break
    return " | ".join(out) or "(no Python frame outside torch)"


def summarize(peak_live: dict[int, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """Blocks alive at the peak grouped by allocation site, largest total first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for ev in peak_live.values():
        groups[where(ev)].append(ev["size"])
    rows = [{"site": k, "blocks": len(v), "bytes": sum(v), "largest": max(v)} for k, v in groups.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


# run_gpu allocates a block of this size between the forward and loss.backward(); its alloc event splits the trace
MARK_BYTES = 10_752  # 21 x 512 B: a multiple of the allocator's rounding, and no tensor of the models has it


def backward_starts(trace: list[dict[str, Any]]) -> int | None:
    """Index of the first event of the backward (the marker's alloc), or None without a marker."""
    return next((i for i, ev in enumerate(trace) if ev.get("action") == "alloc" and ev.get("size") == MARK_BYTES
                 and any(os.path.basename(f.get("filename", "")) == "peak_snapshot.py" for f in ev.get("frames") or [])),
                None)


def held_before(trace: list[dict[str, Any]], segments: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """Blocks allocated before recording began, by size (largest total first): those the trace frees without having
    allocated them, and those the snapshot's segments still hold that the trace never allocated. Their stacks were
    not recorded; sizes alone name the usual suspects (parameters, optimizer state, library workspaces)."""
    seen: set[int] = set()
    sizes: list[int] = []
    for ev in trace:
        if ev.get("action") == "alloc":
            seen.add(ev["addr"])
        elif ev.get("action") == "free_completed" and ev["addr"] not in seen:
            sizes.append(ev["size"])
            seen.add(ev["addr"])
    for seg in segments:
        addr = seg.get("address", 0)
        for b in seg.get("blocks", []):
            at = b.get("address", addr)  # blocks tile their segment in order; newer torch also names the address
            if b.get("state") == "active_allocated" and at not in seen:
                sizes.append(b["size"])
            addr = at + b["size"]
    by: dict[int, int] = defaultdict(int)
    for z in sizes:
        by[z] += 1
    rows = [{"size": z, "blocks": k, "bytes": z * k} for z, k in by.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def run_gpu(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from unsloth_fx import _compat
    from unsloth_fx.api import apply_optimizations
    from unsloth_fx.bench import timed_section
    from unsloth_fx.data import byte_tokens, lm_batches, stdlib_corpus
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    model = build_model(a.model, device="cuda", dtype=torch.bfloat16)
    model.train()
    budget, extra = a.budget, {}
    if a.variant:  # a suite variant's step (its budget, pipeline, tier and check)
        from unsloth_fx.bench import VARIANTS, ufx_arguments

        budget, extra = ufx_arguments(VARIANTS[a.variant][1])
    step_model, opt = apply_optimizations(model, target_vram=budget, optimizer="hybrid_adam", lr=1e-5,
                                          seq_len=a.seq, batch_size=a.batch, **extra)
    chk = (step_model.ufx_report or {}).get("check") or {}
    toks = byte_tokens(stdlib_corpus(max_bytes=max(a.batch * a.seq * (a.warmup + 3) * 2, 1 << 20)))
    batches = lm_batches(toks, a.batch, a.seq, seed=0, epochs=None)

    def step() -> float:
        x, y = next(batches)
        loss = step_model(input_ids=x.cuda(), labels=y.cuda(), use_cache=False).loss
        mark = torch.empty(MARK_BYTES, dtype=torch.uint8, device="cuda")  # the forward ends here (backward_starts)
        del mark
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    torch.cuda.reset_peak_memory_stats()
    print(f"  warm-up step 1/{a.warmup} (compiles): loss {step():.4f}", file=sys.stderr, flush=True)
    # the steps after the compile hold UFX_BENCH_LOCK, as a suite's timed steps do, so a suite timing on the
    # same card is not slowed by them
    with timed_section():
        for i in range(1, a.warmup):
            print(f"  warm-up step {i + 1}/{a.warmup}: loss {step():.4f}", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        peak_all = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        _compat.record_memory_history(True, max_entries=a.max_entries)
        step()
        torch.cuda.synchronize()
        snap = _compat.memory_snapshot()
        _compat.record_memory_history(False)
        measured = torch.cuda.max_memory_allocated()
    dev = torch.cuda.current_device()
    trace = snap["device_traces"][dev]
    peak, peak_live, at = replay(trace, baseline)
    bw_at = backward_starts(trace)
    from unsloth_fx import backend

    ctx = backend.LAST.get("ctx")  # the compiled graph's plan (the last graph compiled)
    plan = ctx.stats.get("joint", {}).get("plan_memory", {}) if ctx is not None else {}
    return {"model": a.model, "seq": a.seq, "batch": a.batch, "budget": budget, "variant": a.variant,
            "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "predicted_peak": chk.get("predicted_peak"), "smallest_feasible": chk.get("smallest_feasible"),
            "plan_predicted_peak": plan.get("predicted_peak"), "plan_recompute": plan.get("recompute"),
            "plan_offload": plan.get("offload"),
            "tier": (step_model.ufx_report or {}).get("optimizer_policy", {}).get("chosen"),
            "measured_peak_recorded_step": measured, "measured_peak_warmup_steps": peak_all,
            "replayed_peak": peak, "baseline": baseline, "trace_events": len(trace), "peak_event": at,
            "backward_starts_at": bw_at, "peak_phase": _phase(at, bw_at),
            "peak_site": where(trace[at]) if at >= 0 else None, "sites": summarize(peak_live, a.top),
            "held_before_recording": held_before(trace, snap.get("segments", []), a.top)}


def _phase(at: int, bw_at: int | None) -> str:
    return "unknown" if bw_at is None or at < 0 else "forward" if at < bw_at else "backward (optimizer fused into it)"


def smoke() -> dict[str, Any]:
    """The replay on a hand-made trace (no GPU): peak, what is alive, grouping by site, the phase of the peak
    and the blocks held from before recording."""
    fr = [{"filename": __file__, "line": 1, "name": "f"}]
    mark = [{"filename": __file__, "line": 1, "name": "step"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100_000, "frames": fr},
             {"action": "alloc", "addr": 2, "size": 50_000, "frames": fr},
             {"action": "alloc", "addr": 9, "size": MARK_BYTES, "frames": mark},  # the backward starts here
             {"action": "free_completed", "addr": 9, "size": MARK_BYTES},
             {"action": "free_requested", "addr": 1, "size": 100_000},
             {"action": "alloc", "addr": 3, "size": 20_000, "frames": fr},  # 1 not yet completed: 170,000 + base
             {"action": "free_completed", "addr": 1, "size": 100_000},
             {"action": "alloc", "addr": 4, "size": 20_000, "frames": fr},
             {"action": "free_completed", "addr": 70, "size": 512}]  # allocated before recording, freed in the step
    segments = [{"address": 2, "blocks": [{"size": 50_000, "state": "active_allocated"}]},  # made in the step
                {"address": 1 << 20, "blocks": [{"size": 4096, "state": "active_allocated"},  # held from before
                                                {"size": 30, "state": "inactive"}]}]  # cached, not allocated
    peak, live, at = replay(trace, 1000)
    bw_at = backward_starts(trace)
    return {"replayed_peak": peak, "peak_event": at, "live": sorted(live), "sites": summarize(live, 5),
            "backward_starts_at": bw_at, "peak_phase": _phase(at, bw_at), "peak_site": where(trace[at]),
            "held_before_recording": held_before(trace, segments, 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-qwen-1.5b")
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", default=None,
                    help="build the step of this unsloth-fx suite variant (unsloth_fx.bench.VARIANTS) instead of "
                         "apply_optimizations at --budget; --budget is then only a label")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--max-entries", type=int, default=500_000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU: check the replay on a hand-made trace")
    a = ap.parse_args(argv)
    rec = smoke() if a.smoke else run_gpu(a)
    if not a.smoke:
        g = lambda b: "-" if b is None else f"{b / GiB:.3f} GiB"  # noqa: E731
        print(f"{a.model} seq {a.seq} budget {rec['budget']} ({a.variant or 'apply_optimizations'}) on {rec['card']} (torch {rec['torch']}), tier {rec['tier']}")
        print(f"  predicted: all saved {g(rec['predicted_peak'])}, the compiled plan "
              f"{g(rec.get('plan_predicted_peak'))} (recompute {rec.get('plan_recompute')}, offload "
              f"{rec.get('plan_offload')}); measured {g(rec['measured_peak_recorded_step'])} "
              f"(recorded step), {g(rec['measured_peak_warmup_steps'])} (warm-up steps incl. compile); "
              f"replayed {g(rec['replayed_peak'])}; before recording {g(rec['baseline'])}")
        print(f"  the peak: event {rec['peak_event']} of {rec['trace_events']}, in the {rec['peak_phase']} "
              f"(backward from event {rec['backward_starts_at']}), allocating at {rec['peak_site']}")
        print("| MiB | blocks | allocated at |\n|---:|---:|---|")
        for r in rec["sites"]:
            print(f"| {r['bytes'] / MiB:,.1f} | {r['blocks']} | {r['site']} |")
        print("blocks allocated before recording, by size (no stacks):\n| MiB | block size | blocks |\n|---:|---:|---:|")
        for r in rec["held_before_recording"]:
            print(f"| {r['bytes'] / MiB:,.1f} | {r['size']:,} | {r['blocks']} |")
    else:
        print(json.dumps(rec, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
