"""HybridAdamW unfused vs fused into the compiled backward: peak memory and step time.

GPU (the lead runs this)::

    python benchmarks/bench_fuse.py --out bench_fuse.json
    # r1-distill-qwen-1.5b, bf16 weights, batch 1, seq 2048, HybridAdamW (hybrid tier),
    # backend="unsloth" (Inductor): variant "unfused" (opt.step() after backward) and
    # "fused" (fuse_optimizer=True + unsloth_fx.fusion.attach; grouped updates, the default) and
    # "fused-ungrouped" (the same with fuse_optimizer{group_bytes=0}: one update call per parameter).
    # --variants unfused,fused picks a subset.

CPU smoke run (tiny-qwen2, eager lowering, seq 64, no memory numbers)::

    python benchmarks/bench_fuse.py --smoke --out /tmp/bench_fuse.json

Each variant runs in its own subprocess (no compile cache or allocator state
carries over). A step is forward + backward + ``opt.step()`` + ``zero_grad``
with random token ids as labels. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (bytes, after
``reset_peak_memory_stats`` following the warm-up); step time is the median of
the timed steps (seconds, ``torch.cuda.synchronize`` around each). The
expected saving is about the gradients' bytes (bf16: 2 bytes x parameters,
3.3 GiB for 1.78B parameters): they are never all alive at once when fused.
The markdown table goes to stdout, the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("unfused", "fused", "fused-ungrouped")  # fused: grouped updates (the default)


def child(a: argparse.Namespace) -> dict:
    """One variant; returns a JSON-able dict."""
    import torch

    from unsloth_fx import fusion
    from unsloth_fx.optim import HybridAdamW
    from unsloth_fx.zoo import build_model

    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(a.model, device=dev, dtype=dtype)
    model.config.use_cache = False
    model.train()
    opt = HybridAdamW(model.named_parameters(), lr=1e-5, weight_decay=0.1, state_precision=a.tier)
    fused = a.variant.startswith("fused")
    if fused:
        fusion.attach(model, opt)
    opts = {"fuse_optimizer": fused, "lower": "eager" if a.smoke else "inductor"}
    if a.pipeline:
        opts["pipeline"] = a.pipeline
    if a.variant == "fused-ungrouped":  # naming the pass again sets its option in place
        opts["pipeline"] = (a.pipeline or "default") + ",fuse_optimizer{group_bytes=0}"
    compiled = torch.compile(model, backend="unsloth", options=opts)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=dev)
        compiled(input_ids=ids, labels=ids).loss.backward()
        grads_alive = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads_alive

    t0 = time.perf_counter()
    step()  # compile + first step (state allocation)
    sync()
    first_s = time.perf_counter() - t0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _lock import timed_section  # no two benchmark cells time at once (UFX_BENCH_LOCK)

    with timed_section():
        for _ in range(a.warmup):
            step()
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, grad_bytes = [], 0
        for _ in range(a.steps):
            sync()
            t = time.perf_counter()
            grad_bytes = step()
            sync()
            times.append(time.perf_counter() - t)
    out = {
        "variant": a.variant, "model": a.model, "seq": a.seq, "batch": a.batch, "tier": a.tier,
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "params": n_params,
        "first_step_s": first_s, "step_s_median": statistics.median(times), "step_s_all": times,
        "grad_bytes_after_backward": grad_bytes,
        "tokens_per_s": a.batch * a.seq / statistics.median(times),
        "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "state_bytes": opt.state_bytes(),
    }
    if fused:
        b = fusion.binding_for(next(model.parameters()), scan=False)
        out["fused_updates_total"] = b.updates if b is not None else 0
    return out


def run_child(a: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--model", a.model, "--seq", str(a.seq),
           "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--tier", a.tier]
    if a.smoke:
        cmd.append("--smoke")
    if a.pipeline:
        cmd += ["--pipeline", a.pipeline]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        return {"variant": variant, "error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gib(x):
    from unsloth_fx.options import format_bytes

    return "n/a" if x is None else format_bytes(x)


def table(rows: list[dict]) -> str:
    lines = ["| variant | peak memory | grads alive after backward | step time (median) | tokens/s | device |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {_gib(r['peak_bytes'])} | {_gib(r['grad_bytes_after_backward'])} | "
                     f"{r['step_s_median'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} | {r['device']} |")
    ok = {r["variant"]: r for r in rows if "error" not in r}
    base = ok.get("unfused")
    for v in ("fused", "fused-ungrouped"):
        r = ok.get(v)
        if base is None or r is None:
            continue
        saved = f"{v} saves {_gib(base['peak_bytes'] - r['peak_bytes'])} of peak; " if base["peak_bytes"] else ""
        lines.append(f"\n{saved}step time ratio {v}/unfused {r['step_s_median'] / base['step_s_median']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny-qwen2, eager lowering, seq 64")
    ap.add_argument("--model", default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--tier", default="hybrid")
    ap.add_argument("--pipeline", default=None, help="pipeline string for both variants (default: the backend's)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    a = ap.parse_args()
    a.model = a.model or ("tiny-qwen2" if a.smoke else "r1-distill-qwen-1.5b")
    a.seq = a.seq or (64 if a.smoke else 2048)
    a.steps = a.steps or (2 if a.smoke else 10)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.smoke else 3)
    if a.smoke and a.pipeline is None:
        a.pipeline = "fuse_optimizer"  # plan_memory costs seconds on CPU and is the same for both variants
    if a.child:
        print(json.dumps(child(a)))
        return
    rows = [run_child(a, v) for v in a.variants.split(",")]
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "args": {k: v for k, v in vars(a).items() if k not in ("child", "variant")}},
                      f, indent=2)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
