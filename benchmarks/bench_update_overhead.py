"""Per-parameter cost of the in-backward update: host (CPU) time per call and device time per step.

    python benchmarks/bench_update_overhead.py --out update_overhead.json

The fused backward calls ``torch.ops.unsloth_fx.fused_adamw_step_`` once per parameter
(339 calls per step for r1-distill-qwen-1.5b). When the host time per call exceeds the
backward's device time per parameter, the step becomes host-bound. This script measures,
for the parameter shapes of ``--model`` (built on the meta device, then allocated on the
GPU with random gradients):

* ``host us/call``: wall time of the 339 calls with tiny stand-in tensors (1024 elements each,
  same count and names), divided by the call count: the launch path alone;
* ``step ms``: wall time of one full pass over the real shapes (after a synchronize), i.e.
  what the update costs a step when nothing overlaps it;
* for comparison, ``torch.optim.AdamW(fused=True).step()`` over the same real shapes.

Each tier is one row. GPU only; prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _params(model: str, device: str, tiny: bool):
    import torch

    from unsloth_fx.zoo import build_model

    meta = build_model(model, device="meta", dtype=torch.bfloat16)
    out = []
    for name, p in meta.named_parameters():
        shape = (1024,) if tiny and p.ndim == 1 else ((32, 32) if tiny else tuple(p.shape))
        t = torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02)
        out.append((name, t))
    return out


def _time_fused(tier: str, named, grads, reps: int) -> float:
    import torch

    from unsloth_fx import fusion
    from unsloth_fx.optim import HybridAdamW

    opt = HybridAdamW(named, lr=1e-5, state_precision=tier)
    params = [p for _, p in named]
    b = fusion.attach(params, opt)
    slots = [fusion.slot_for(p, b) for p in params]
    op = torch.ops.unsloth_fx.fused_adamw_step_
    extra = ([],) if len(op.default._schema.arguments) == 5 else ()  # newer op: the "after" list

    def one_pass():
        for (name, p), g, s in zip(named, grads, slots):
            op(p, g, name, s, *extra)
        opt.step()  # advances the step count (the parameters have no .grad)

    one_pass()  # state allocation, first-step gate
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        one_pass()
        _sync()
        times.append(time.perf_counter() - t)
    fusion.detach(opt)
    return statistics.median(times)


def _time_torch(named, grads, reps: int) -> float:
    import torch

    params = [p for _, p in named]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-5, fused=params[0].is_cuda or None)
    opt.step()
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.step()
        _sync()
        times.append(time.perf_counter() - t)
    for p in params:
        p.grad = None
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="r1-distill-qwen-1.5b")
    ap.add_argument("--tiers", default="fp32,int8,hybrid")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (tiny model)")
    a = ap.parse_args()
    import torch

    rows = []
    for tier in a.tiers.split(","):
        row = {"tier": tier}
        for tiny in ((True, False) if a.device == "cuda" else (True, True)):
            named = _params(a.model, a.device, tiny)
            grads = [torch.randn_like(p) * 1e-3 for _, p in named]
            dt = _time_fused(tier, named, grads, a.reps)
            if tiny:
                row["calls"] = len(named)
                row["host_us_per_call"] = dt / len(named) * 1e6
            else:
                row["step_ms"] = dt * 1e3
            del named, grads
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    named = _params(a.model, a.device, False)
    grads = [torch.randn_like(p) * 1e-3 for _, p in named]
    torch_ms = _time_torch(named, grads, a.reps) * 1e3
    named_tiny = _params(a.model, a.device, True)
    grads_tiny = [torch.randn_like(p) * 1e-3 for _, p in named_tiny]
    torch_tiny = _time_torch(named_tiny, grads_tiny, a.reps)
    rows.append({"tier": "torch AdamW fused (bf16 state)", "calls": 1,
                 "host_us_per_call": torch_tiny / len(named_tiny) * 1e6, "step_ms": torch_ms})
    print(f"{a.model}, {torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    print("| update | calls/step | host us per parameter | step ms (real shapes) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tier']} | {r['calls']} | {r['host_us_per_call']:.1f} | {r.get('step_ms', float('nan')):.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
