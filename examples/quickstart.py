"""Quickstart: train a DeepSeek-R1-family model through the `unsloth` backend.

    python examples/quickstart.py                       # tiny-deepseek-v3 on CPU (or GPU if present)
    python examples/quickstart.py --model r1-distill-qwen-1.5b --seq 2048 --steps 6 --compare-stock

Prints the loss per step, peak memory and tokens/s, and where the dump (graphs
after every pass, pass stats) went. Weights are random (no download); the text
is the Python standard library's own source, byte-level tokens folded into the
model's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from unsloth_fx.data import byte_tokens, stdlib_corpus
from unsloth_fx.zoo import build_model, count_parameters


def _batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0):
    tokens = byte_tokens(stdlib_corpus(max_bytes=max(4 << 20, batch * (seq + 1) * steps * 2)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([tokens[s: s + seq] for s in starts.tolist()]) % vocab


def _optimizer(name: str, params, lr: float):
    if name == "hybrid":
        from unsloth_fx.optim import HybridAdamW

        return HybridAdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=torch.cuda.is_available() or None)


def train(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    model = build_model(args.model, device=device, dtype=dtype)
    model.config.use_cache = False
    model.train()
    n_params = count_parameters(model)
    opt = _optimizer(args.optimizer, model.parameters(), args.lr)

    if args.backend == "unsloth":
        options = {"lower": args.lower, "dump": args.dump}
        if args.budget:
            options["memory_budget"] = args.budget
        compiled = torch.compile(model, backend="unsloth", options=options)
    elif args.backend == "inductor":
        compiled = torch.compile(model)
    else:
        compiled = model

    print(f"[quickstart] {args.model}: {n_params / 1e6:.1f}M parameters, {dtype}, {device}, "
          f"backend={args.backend}, optimizer={args.optimizer}", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_compile = None
    for step, ids in enumerate(_batches(model.config.vocab_size, args.batch, args.seq, args.steps, args.seed)):
        ids = ids.to(device)
        t0 = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step == 0:
            t_compile = dt
        times.append(dt)
        losses.append(loss.item())
        print(f"  step {step}: loss {losses[-1]:.4f}  ({dt:.2f} s)", flush=True)
    timed = times[2:] if len(times) > 3 else times[1:] or times
    med = sorted(timed)[len(timed) // 2]
    result = {
        "model": args.model, "backend": args.backend, "optimizer": args.optimizer, "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "losses": losses,
        "first_step_s": t_compile, "median_step_s": med, "tokens_per_s": args.batch * args.seq / med,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    peak = f"{result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else "n/a on CPU"
    print(f"[quickstart] peak {peak}, {result['tokens_per_s']:.0f} tokens/s (median of steps after warm-up), "
          f"first step {t_compile:.1f} s", flush=True)
    if args.backend == "unsloth":
        from unsloth_fx.backend import LAST

        where = LAST.get("dump_dir") or "(no dump: pass --dump DIR)"
        print(f"[quickstart] dump: {where}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-deepseek-v3")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--optimizer", choices=["adamw", "hybrid"], default="adamw")
    p.add_argument("--backend", choices=["unsloth", "inductor", "eager"], default="unsloth")
    p.add_argument("--lower", choices=["inductor", "eager"], default=None, help="default: inductor on GPU, eager on CPU")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 7GiB")
    p.add_argument("--dump", default="ufx_dump", help="dump directory ('' for none)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if a GPU is present")
    p.add_argument("--compare-stock", action="store_true", help="also run stock torch.compile, each in its own process")
    p.add_argument("--json", default=None, help="write the result(s) as JSON here")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.lower = args.lower or ("inductor" if gpu else "eager")
    args.dump = args.dump or None

    if not args.compare_stock:
        res = [train(args)]
    else:
        res = []
        for backend in ("inductor", "unsloth"):  # separate processes: peaks must not mix
            cmd = [sys.executable, os.path.abspath(__file__), *[a for a in (argv or sys.argv[1:]) if a != "--compare-stock"],
                   "--backend", backend, "--json", f"/tmp/ufx_quickstart_{backend}.json"]
            subprocess.run(cmd, check=True)
            with open(f"/tmp/ufx_quickstart_{backend}.json") as f:
                res.extend(json.load(f))
        print("\n| backend | peak GiB | tokens/s | first step s | final loss |\n|---|---:|---:|---:|---:|")
        for r in res:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            print(f"| {r['backend']} | {peak} | {r['tokens_per_s']:,.0f} | {r['first_step_s']:.1f} | {r['losses'][-1]:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
