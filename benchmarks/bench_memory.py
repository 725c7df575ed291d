"""GPU validation of the memory model and scheduler (issue 3).

For r1-distill-qwen-1.5b (bf16 weights, stock torch.optim.AdamW: bf16 moments,
i.e. optimizer="adamw-bf16") at seq 1024/2048/4096 x budgets 8/12/16 GiB, each
cell in its own subprocess:

* ours:   torch.compile(backend="unsloth", options={"lower": "inductor", "memory_budget": B})
* stock:  torch.compile(model) (Inductor, no budget)
* torch-budget: stock compile with torch._functorch.config.activation_memory_budget = 0.5

Recorded per cell: the plan's predicted peak (plan_memory stats), measured
torch.cuda.max_memory_allocated over 3 steps after 2 warm-up steps, tokens/s,
or the infeasibility message. Prints a markdown table, writes JSON to --out.

    python benchmarks/bench_memory.py --out bench_memory.json
    python benchmarks/bench_memory.py --smoke          # CPU, tiny model, eager lowering
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 2**30

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lock import parallel_map, timed_section  # noqa: E402


def run_cell(model: str, seq: int, budget: int | None, mode: str, device: str, lower: str, steps: int) -> dict:
    import torch

    import unsloth_fx.backend as backend
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = build_model(model, device=device, dtype=dtype)
    m.config.use_cache = False
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    if mode == "ours":
        # plan_memory{optimizer=...} makes the model count torch AdamW's bf16 moments
        optname = "adamw-bf16" if dtype == torch.bfloat16 else "adamw"
        opts = {"lower": lower, "pipeline": f"default,plan_memory{{optimizer={optname}}}"}
        if budget:
            opts["memory_budget"] = budget
        f = torch.compile(m, backend="unsloth", options=opts)
    elif mode == "torch-budget":
        import torch._functorch.config as fc

        fc.activation_memory_budget = 0.5
        f = torch.compile(m) if device == "cuda" else torch.compile(m, backend="aot_eager")
    else:
        f = torch.compile(m) if device == "cuda" else torch.compile(m, backend="aot_eager")
    ids = torch.randint(0, m.config.vocab_size, (1, seq), device=device)
    out: dict = {"model": model, "seq": seq, "budget": budget, "mode": mode}

    def step():
        loss = f(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        step()  # compiles; may overlap another cell's timing (see benchmarks/_lock.py)
        with timed_section():
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
                out["measured_peak"] = torch.cuda.max_memory_allocated()
            dt = time.perf_counter() - t
        out["tokens_per_s"] = steps * seq / dt
    except ValueError as e:  # InfeasibleBudget from the plan (may arrive wrapped by Dynamo)
        out["infeasible"] = str(e).splitlines()[0][:400]
    except Exception as e:  # noqa: BLE001 - report, do not crash the table
        msg = str(e)
        if "infeasible" in msg:
            out["infeasible"] = msg[msg.find("memory_budget"):][:400]
        else:
            out["error"] = f"{type(e).__name__}: {msg[:400]}"
    stats = backend.LAST.get("ctx").stats.get("joint", {}).get("plan_memory", {}) if backend.LAST.get("ctx") else {}
    if stats:
        out["predicted_peak"] = stats.get("predicted_peak")
        out["feasible"] = stats.get("feasible")
        out["recompute"] = stats.get("recompute")
    if out.get("predicted_peak") and out.get("measured_peak"):
        out["error_pct"] = 100.0 * (out["predicted_peak"] - out["measured_peak"]) / out["measured_peak"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-qwen2, eager lowering (no GPU numbers)")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one JSON-encoded cell
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--budgets", default="8,12,16", help="GiB, comma-separated")
    ap.add_argument("--modes", default="stock,torch-budget,ours")
    ap.add_argument("--jobs", type=int, default=1, help="cells compiling at once (timing stays serial)")
    a = ap.parse_args()
    if a.cell:
        c = json.loads(a.cell)
        print("CELL " + json.dumps(run_cell(**c)))
        return 0
    if a.smoke:
        model, device, lower, seqs, budgets = "tiny-qwen2", "cpu", "eager", [128], [None, 8 * 2**20]
    else:
        model, device, lower = "r1-distill-qwen-1.5b", "cuda", "inductor"
        seqs = [int(x) for x in a.seqs.split(",")]
        budgets = [int(float(x) * GiB) for x in a.budgets.split(",")]
    modes = a.modes.split(",")
    cells = []
    for seq in seqs:
        for mode in ("stock", "torch-budget"):
            if mode in modes:
                cells.append(dict(model=model, seq=seq, budget=None, mode=mode, device=device, lower=lower, steps=a.steps))
        if "ours" in modes:
            for b in budgets:
                cells.append(dict(model=model, seq=seq, budget=b, mode="ours", device=device, lower=lower, steps=a.steps))

    def run(c):
        print(f"running {c['mode']} seq={c['seq']} budget={c['budget']}", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, __file__, "--cell", json.dumps(c)], capture_output=True, text=True,
                           env={**os.environ}, timeout=3600)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CELL ")), None)
        print(f"done {c['mode']} seq={c['seq']} budget={c['budget']}", file=sys.stderr, flush=True)
        r = json.loads(line[5:]) if line else {**c, "error": p.stderr[-400:]}
        with open(a.out + ".partial.jsonl", "a") as f:  # each cell as it finishes: a killed run keeps its cells
            f.write(json.dumps(r) + "\n")
        return r

    results = parallel_map(run, cells, a.jobs)
    hdr = "| mode | seq | budget GiB | predicted GiB | measured GiB | error % | tokens/s | note |"
    print(hdr)
    print("|" + "---|" * 8)
    for r in results:
        g = (lambda k: f"{r[k] / GiB:.2f}" if r.get(k) else "-")
        note = r.get("infeasible") or r.get("error") or (f"recompute {r['recompute']}" if r.get("recompute") else "")
        print(f"| {r['mode']} | {r['seq']} | {r['budget'] / GiB if r.get('budget') else '-'} | {g('predicted_peak')} | "
              f"{g('measured_peak')} | {r.get('error_pct', float('nan')):.1f} | {r.get('tokens_per_s', 0):.0f} | "
              f"{note[:80]} |")
    with open(a.out, "w") as f:
        json.dump({"device": device, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
