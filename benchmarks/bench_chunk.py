"""Chunked LM head + CE and chunked MLP recompute vs unchunked: peak memory and tokens/s.

GPU (the lead runs this)::

    python benchmarks/bench_chunk.py --out bench_chunk.json
    # r1-distill-qwen-1.5b, bf16, batch 1, seq 2048 and 8192; variants: unchunked,
    # chunked (fuse_linear_cross_entropy + split_token_chunks + chunk_recompute),
    # liger (liger_kernel's fused linear CE, if it imports); plus the largest
    # sequence that fits in --fit-limit (default 16GiB) for each variant.

CPU smoke run (tiny-qwen2, eager lowering, no memory numbers)::

    python benchmarks/bench_chunk.py --smoke --out /tmp/bench_chunk.json

Each measurement runs in its own subprocess, so compile caches and the CUDA
caching allocator never carry over. A step is forward + backward with random
token ids as labels; no optimizer (it does not change between variants), grads
set to None between steps. Peak memory is ``torch.cuda.max_memory_allocated``
over the timed steps (bytes); tokens/s counts batch x seq tokens per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lock import parallel_map, timed_section  # noqa: E402

VARIANTS = ("unchunked", "chunked", "liger")


def _pipeline(variant: str, chunks: int) -> str:
    if variant == "chunked":
        return (f"default,+split_token_chunks{{chunks={chunks}}},+fuse_linear_cross_entropy{{chunks={chunks}}},"
                f"chunk_recompute{{chunks={chunks}}}")
    return "default"


def child(a: argparse.Namespace) -> dict:
    """One variant at one sequence length; returns a JSON-able dict."""
    import torch

    from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm
    from unsloth_fx.zoo import build_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda" and a.mem_limit:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_limit / torch.cuda.get_device_properties(0).total_memory))
    model = build_model(a.model, device=dev, dtype=dtype)
    model.config.use_cache = False
    model.train()
    if a.variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    if a.variant in ("chunked", "liger"):
        patch_causal_lm(model)  # drops logits in training, the same way for both fused variants
    opts = {"lower": a.lower, "pipeline": _pipeline(a.variant, a.chunks)}
    step_model = torch.compile(model, backend="unsloth", options=opts)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device=dev)

    def step() -> None:
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    step()  # compiles; may overlap another cell's timing (see benchmarks/_lock.py)
    with timed_section():
        for _ in range(a.warmup - 1):
            step()
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        dt = time.perf_counter() - t0
    return {
        "variant": a.variant, "model": a.model, "seq": a.seq, "batch": a.batch, "chunks": a.chunks,
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
        "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "tokens_per_s": a.batch * a.seq * a.steps / dt, "step_s": dt / a.steps,
    }


def run_child(a: argparse.Namespace, variant: str, seq: int, mem_limit: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--variant", variant, "--seq", str(seq),
           "--model", a.model, "--batch", str(a.batch), "--chunks", str(a.chunks), "--lower", a.lower,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--mem-limit", str(mem_limit)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": variant, "seq": seq, "error": err[:300], "oom": "out of memory" in p.stderr.lower()}


def largest_fit(a: argparse.Namespace, variant: str, limit: int) -> int | None:
    """Largest multiple of --fit-step tokens whose step runs under ``limit`` bytes (doubling, then bisection)."""
    ok, lo, hi = None, a.fit_step, None
    seq = a.fit_step
    while seq <= a.fit_max:
        r = run_child(a, variant, seq, limit)
        if "error" in r:
            hi = seq
            break
        ok, lo = seq, seq
        seq *= 2
    if hi is None:
        return ok
    while hi - lo > a.fit_step:
        mid = (lo + hi) // 2 // a.fit_step * a.fit_step
        if "error" in run_child(a, variant, mid, limit):
            hi = mid
        else:
            ok, lo = mid, mid
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-qwen-1.5b")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lower", default="inductor", choices=("inductor", "eager"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fit-limit", default="16GiB", help="memory for the largest-sequence search; 0 skips it")
    ap.add_argument("--fit-step", type=int, default=1024)
    ap.add_argument("--fit-max", type=int, default=131072)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--jobs", type=int, default=1, help="cells compiling at once (timing stays serial)")
    ap.add_argument("--out", default="bench_chunk.json")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny-qwen2, seq 64/128, eager, no fit search")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="unchunked", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--mem-limit", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(child(a)))
        return
    if a.smoke:
        a.model, a.seqs, a.lower, a.fit_limit, a.steps, a.warmup, a.chunks = "tiny-qwen2", "64,128", "eager", "0", 2, 1, 4
    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except ImportError:
        have_liger = False
    variants = [v for v in a.variants.split(",") if v != "liger" or have_liger]
    from unsloth_fx.options import format_bytes, parse_bytes

    cells = [(v, int(s)) for s in a.seqs.split(",") for v in variants]
    rows = parallel_map(lambda c: run_child(a, *c), cells, a.jobs)
    limit = parse_bytes(a.fit_limit) if a.fit_limit not in ("0", "") else 0
    fits = {v: largest_fit(a, v, limit) for v in variants} if limit else {}
    print(f"\n{a.model}, batch {a.batch}, chunks {a.chunks}, lower={a.lower}"
          + ("" if have_liger else " (liger_kernel not importable: no liger column)"))
    print("| variant | seq | peak memory | tokens/s | note |\n|---|---|---|---|---|")
    for r in rows:
        peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "not measured (CPU)"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        print(f"| {r['variant']} | {r['seq']} | {peak if 'error' not in r else '-'} | {tps} | "
              f"{('OOM' if r.get('oom') else r['error']) if 'error' in r else ''} |")
    if fits:
        print(f"\nLargest seq (multiple of {a.fit_step}) fitting in {a.fit_limit}: "
              + ", ".join(f"{v}: {s}" for v, s in fits.items()))
    with open(a.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "rows": rows,
                   "largest_fit": fits, "fit_limit": a.fit_limit}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
