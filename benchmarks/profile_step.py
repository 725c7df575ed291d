"""Where a training step's GPU time goes: torch.profiler over a few steps, top kernels by CUDA time.

    python benchmarks/profile_step.py --variant ufx --budget 24GiB --out prof_ufx.txt
    python benchmarks/profile_step.py --variant compile-bf16 --out prof_stock.txt
    python benchmarks/profile_step.py --variant compile-amp --out prof_amp.txt  # the suite's stock AMP
    python benchmarks/profile_step.py --model deepseek-v3-mini --variant chunked --optimizer none

``unchunked`` / ``chunked``: the backend with ``benchmarks/bench_chunk.py``'s pipeline of that name
(``--chunks``), the same step that benchmark times.

``ufx``: ``unsloth_fx.apply_optimizations`` (HybridAdamW, the budget's plan); ``compile-bf16``:
stock ``torch.compile`` with bf16 weights and ``torch.optim.AdamW(fused=True)``; ``compile-amp``: the
same with fp32 weights under bf16 autocast (the suite's ``compile-amp``). Random token ids,
batch 1. After ``--warmup`` steps (the first compiles), ``--steps`` steps run under the profiler;
the report gives wall time per step, the summed CUDA kernel time per step, the number of kernel
launches per step, the kernel time per category (:func:`kernel_category`: matmul, attention,
Inductor's Triton kernels, the optimizer's, copies, other), and the top kernels. GPU only (the profile of a CPU run says nothing useful).
"""

from __future__ import annotations

import argparse
import time


_CATEGORIES = (  # (category, substrings of a CUDA kernel's name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "splitkreduce")),
    ("optimizer", ("adam", "hybrid", "bookkeep", "multi_tensor")),
    ("triton", ("triton_",)),  # before copy: Inductor names fused kernels after their ops (``..._to_copy_...``)
    ("copy", ("memcpy", "memset", "copy_")),
)


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel by its name: attention, matmul, optimizer, copy, triton or other."""
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="r1-distill-qwen-1.5b")
    ap.add_argument("--variant", choices=("ufx", "compile-bf16", "compile-amp", "unchunked", "chunked"), default="ufx")
    ap.add_argument("--chunks", type=int, default=8, help="for the chunked variant")
    ap.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                    help="none: forward + backward only, as bench_chunk.py times (not for ufx)")
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.variant == "ufx" and a.optimizer == "none":
        ap.error("--optimizer none is for the stock and pipeline variants; ufx's optimizer is fused into backward")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    amp = a.variant == "compile-amp"
    model = build_model(a.model, device="cuda", dtype=torch.float32 if amp else torch.bfloat16)
    model.train()
    if a.variant == "ufx":
        from unsloth_fx.api import apply_optimizations

        f, opt = apply_optimizations(model, target_vram=a.budget, optimizer="hybrid_adam", lr=1e-5,
                                     seq_len=a.seq, batch_size=1)
    elif a.variant in ("compile-bf16", "compile-amp"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        f = torch.compile(model)
    else:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_chunk import _pipeline

        from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

        model.config.use_cache = False
        if a.variant == "chunked":
            patch_causal_lm(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        f = torch.compile(model, backend="unsloth", options={"pipeline": _pipeline(a.variant, a.chunks)})
    if a.optimizer == "none":
        opt = None
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = f(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is None:
            for p in model.parameters():
                p.grad = None
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)

    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _lock import timed_section  # serialize the GPU work with other benchmark cells (UFX_BENCH_LOCK)

    step()  # compiles (CPU work): outside the lock
    lock = timed_section()
    lock.__enter__()
    for _ in range(a.warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / a.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "device_time_total", 0)]
    kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
    cuda_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    lines = [f"{a.model} {a.variant} budget={a.budget if a.variant == 'ufx' else '-'} seq={a.seq}: "
             f"wall {wall * 1e3:.1f} ms/step (unprofiled), CUDA kernel time {cuda_us / 1e3 / a.steps:.1f} ms/step, "
             f"{len(kern) // a.steps} kernels/step, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"]
    cats: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            c = cats.setdefault(kernel_category(e.key), [0.0, 0])
            c[0] += e.device_time_total
            c[1] += e.count
    lines.append("kernel time per step by category: " + ", ".join(
        f"{k} {us / 1e3 / a.steps:.1f} ms ({n // a.steps} launches)" for k, (us, n) in
        sorted(cats.items(), key=lambda kv: -kv[1][0])))
    lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=a.top, max_name_column_width=70))
    lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))
    del events
    lock.__exit__(None, None, None)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
