"""Optimizer-step bandwidth: fused HybridAdamW kernels vs torch and torchao.

GPU run (what the lead records in docs/benchmarks.md):

    python benchmarks/bench_optim.py --out bench_optim.json

prints a markdown table: for 256M and 1B parameters (split into tensors of
``--tensor-numel`` elements, as in a real model), per tier: median step time,
bytes moved (read + written, counted per tier, see ``bytes_per_param``),
achieved GB/s and % of the device-to-device copy bandwidth measured in the
same run; beside ``torch.optim.AdamW(fused=True)`` with fp32 and bf16 state
and torchao ``AdamW8bit`` / ``AdamW4bit`` when torchao imports.

``--smoke`` runs tiny sizes on CPU (the reference path) so the script itself
is tested; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from unsloth_fx.runtime import adamw as K

HP = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def bytes_per_param(tier: str, *, p_bytes: int = 2, g_bytes: int = 2, hybrid_fp32_frac: float = 0.0,
                    hybrid_bits: int = 4) -> float:
    """Bytes read + written per parameter element by one fused step."""
    pg = 2 * p_bytes + g_bytes  # weight read and written, gradient read
    sc = 2 * 2 * 4 / K.BLOCK  # two fp32 scales per block, read and written
    if tier == "fp32":
        return pg + 2 * 2 * 4
    if tier == "bf16":
        return pg + 2 * 2 * 2
    if tier == "int8":
        return pg + 2 * 2 * 1 + sc
    if tier == "int4":
        return pg + 2 * 2 * 0.5 + sc
    if tier == "hybrid":
        low = bytes_per_param(f"int{hybrid_bits}", p_bytes=p_bytes, g_bytes=g_bytes) - pg
        return pg + 2 * 4 / K.BLOCK + (1 - hybrid_fp32_frac) * low + hybrid_fp32_frac * 2 * 2 * 4
    raise ValueError(tier)


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        def t(fn):
            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        return t

    def t(fn):
        fn()
        xs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return statistics.median(xs)
    return t


def _split(total: int, chunk: int) -> list[int]:
    sizes = [chunk] * (total // chunk)
    if total % chunk:
        sizes.append(total % chunk)
    return sizes


def _params(sizes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    ps = [torch.randn(n, generator=gen, device=device, dtype=torch.float32).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen, device=device, dtype=torch.float32) * 1e-2).to(dtype) for n in sizes]
    return ps, gs


def bench_copy(total_bytes: int, device, timer) -> float:
    n = total_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / t  # bytes read + written per second


def bench_ours(tier, sizes, device, timer, hybrid_frac=0.1):
    ps, gs = _params(sizes, torch.bfloat16, device)
    states = []
    for p in ps:
        st = K.init_state(tier, p, hybrid_bits=4, hybrid_cap=hybrid_frac)
        if tier == "hybrid":  # fill the cap: the worst case for bytes moved
            k = st["pool_m"].shape[0]
            st["slot"][:k] = torch.arange(k, dtype=torch.int32, device=device)
        states.append(st)
    hyper = K._hyper(ps[0], HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"], 3.0)
    hp = dict(lr=hyper[0], betas=(hyper[1], hyper[2]), eps=hyper[3], weight_decay=hyper[4], step=hyper[5])

    # warm the state with real updates (nonzero moments, real scales)
    def step():
        for p, g, st in zip(ps, gs, states):
            K.adamw_step_state(tier, p, g, st, seed=1, **hp)
    for _ in range(2):
        step()
    t = timer(step)
    real_frac = 0.0
    if tier == "hybrid":
        real_frac = sum(int((s["slot"] >= 0).sum()) for s in states) / sum(s["slot"].numel() for s in states)
    state_b = sum(K.state_nbytes(s) for s in states) / sum(sizes)
    del ps, gs, states
    return t, bytes_per_param(tier, hybrid_fp32_frac=real_frac), state_b


def bench_torch(state_dtype, sizes, device, timer):
    ps, gs = _params(sizes, state_dtype, device)
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    try:
        opt = torch.optim.AdamW(params, fused=True, **HP)
    except RuntimeError:  # no fused kernel for this device
        opt = torch.optim.AdamW(params, foreach=True, **HP)
    for _ in range(2):
        opt.step()
    t = timer(opt.step)
    b = state_dtype.itemsize
    del opt, params, ps, gs
    return t, 7 * b, 2 * b  # read p, g, m, v; write p, m, v


def bench_torchao(name, sizes, device, timer):
    try:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit
    except Exception as e:  # noqa: BLE001 - any import failure means "skip"
        return None, f"torchao not importable ({type(e).__name__}: {e})"
    cls = {"AdamW8bit": AdamW8bit, "AdamW4bit": AdamW4bit}[name]
    ps, gs = _params(sizes, torch.bfloat16, device)
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    opt = cls(params, bf16_stochastic_round=True, **HP)
    for _ in range(2):
        opt.step()
    t = timer(opt.step)
    del opt, params, ps, gs
    bpp = {"AdamW8bit": bytes_per_param("int8"), "AdamW4bit": bytes_per_param("int4")}[name]
    return t, bpp  # counted as the bytes the same tier *must* move (torchao's block size differs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (tests the script)")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts (default 256M,1B)")
    ap.add_argument("--tensor-numel", type=int, default=16 * 2 ** 20)
    ap.add_argument("--tiers", default="fp32,bf16,int8,int4,hybrid")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--out", default="bench_optim.json")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        sizes_total = [int(x) for x in (args.sizes or "20000").split(",")]
        chunk = min(args.tensor_numel, 8192)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_optim.py needs a CUDA GPU (use --smoke on CPU)")
        device = torch.device("cuda")
        sizes_total = [int(float(x)) for x in (args.sizes or "268435456,1073741824").split(",")]
        chunk = args.tensor_numel
    timer = _timer(device)
    tiers = [t for t in args.tiers.split(",") if t]

    meta = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "smoke": args.smoke, "uses_triton": K.uses_triton(torch.empty(0, device=device))}
    if device.type == "cuda":
        import triton
        meta.update(card=torch.cuda.get_device_name(), triton=triton.__version__)
    copy_bw = bench_copy(min(2 ** 31, 4 * max(sizes_total)), device, timer)
    meta["copy_GBps"] = copy_bw / 1e9
    rows, notes = [], []
    for total in sizes_total:
        sizes = _split(total, chunk)
        for tier in tiers:
            t, bpp, sb = bench_ours(tier, sizes, device, timer)
            rows.append(dict(params=total, impl=f"unsloth_fx {tier}", state_bytes_per_param=sb,
                             time_s=t, bytes_per_param=bpp))
        for dt in (torch.float32, torch.bfloat16):
            t, bpp, sb = bench_torch(dt, sizes, device, timer)
            rows.append(dict(params=total, impl=f"torch AdamW fused, {str(dt)[6:]} params+state",
                             state_bytes_per_param=sb, time_s=t, bytes_per_param=bpp))
        if not args.no_torchao and device.type == "cuda":
            for name in ("AdamW8bit", "AdamW4bit"):
                r = bench_torchao(name, sizes, device, timer)
                if r[0] is None:
                    notes.append(f"skipped torchao {name}: {r[1]}")
                    continue
                rows.append(dict(params=total, impl=f"torchao {name}", state_bytes_per_param=None,
                                 time_s=r[0], bytes_per_param=r[1]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["bytes_moved"] = r["bytes_per_param"] * r["params"]
        r["GBps"] = r["bytes_moved"] / r["time_s"] / 1e9
        r["pct_copy"] = 100 * r["bytes_moved"] / r["time_s"] / copy_bw

    print(f"device: {meta.get('card', device)}  torch {meta['torch']}  "
          f"copy bandwidth {meta['copy_GBps']:.0f} GB/s (read+write)")
    print("| params | implementation | state B/param | time ms | bytes moved GB | GB/s | % of copy |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sb = "" if r["state_bytes_per_param"] is None else f"{r['state_bytes_per_param']:.3f}"
        print(f"| {r['params'] / 1e6:.0f}M | {r['impl']} | {sb} | {r['time_s'] * 1e3:.3f} | "
              f"{r['bytes_moved'] / 1e9:.3f} | {r['GBps']:.0f} | {r['pct_copy']:.1f} |")
    for n in notes:
        print("note:", n)
    if not args.no_torchao and device.type != "cuda":
        print("note: torchao rows run on CUDA only")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "notes": notes}, f, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
