"""Do the gradients the compiled step hands its optimizer agree with autograd's?

One training step of a model with random weights, three ways, on the same bf16 weights and batch:

* **fp32 reference**: the weights upcast to fp32, eager forward and backward (the truth);
* **eager bf16**: stock eager in bf16 (the error a bf16 step has anyway);
* **ours**: ``apply_optimizations`` at ``--budget`` (chunking, recompute, offload and the fused
  update as it plans them). The gradients are read where the optimizer receives them
  (``HybridAdamW.step_param(s)``, wrapped), so with the update fused into backward they are the
  values the update used.

Per parameter: relative error ``||g - g_fp32|| / ||g_fp32||`` of ours and of eager bf16, and their
ratio. A parameter whose gradient is missing, or wrong beyond bf16 rounding, stands out as a
large ratio. Prints a summary and the worst parameters; ``--out`` writes every parameter's figures.

    python3 benchmarks/grad_agreement.py --budget 7GiB --seq 2048              # GPU, r1-distill-qwen-1.5b
    python3 benchmarks/grad_agreement.py --budget none --pipeline "default,plan_memory{optimizer={OPTIMIZER}}"
    python3 benchmarks/grad_agreement.py --smoke                               # CPU, tiny-qwen2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch


def _batch(seq: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from unsloth_fx.data import byte_tokens, lm_batches, stdlib_corpus

    toks = byte_tokens(stdlib_corpus(max_bytes=max(batch * seq * 4, 1 << 20)))
    x, y = next(lm_batches(toks, batch, seq, seed=0, epochs=None))  # the suite's first batch
    return x.to(device), y.to(device)


def _eager_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=x, labels=y, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _our_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace
               ) -> tuple[float, dict[str, torch.Tensor], dict[str, Any]]:
    from unsloth_fx import backend
    from unsloth_fx.api import apply_optimizations

    torch._dynamo.reset()  # a compile bound to this optimizer, not a cached one from an earlier call
    names = {id(p): n for n, p in model.named_parameters()}
    kw: dict[str, Any] = {"check": not a.no_check}
    if a.tiers:
        sp, hp = a.tiers.split("/")
        kw["optimizer_options"] = {"state_precision": sp, "high_precision_tier": hp}
    if a.pipeline:
        kw["pipeline"] = a.pipeline
    if a.smoke:
        kw["lower"] = "eager"
    budget = None if a.budget == "none" else a.budget
    step_model, opt = apply_optimizations(model, target_vram=budget, optimizer="hybrid_adam", lr=a.lr,
                                          seq_len=a.seq, batch_size=a.batch, **kw)
    seen: dict[str, torch.Tensor] = {}

    def record(p: torch.Tensor, g: torch.Tensor) -> None:
        n = names.get(id(p), f"<unnamed {tuple(p.shape)}>")
        if n in seen:
            print(f"  note: {n} received a second gradient in one step", file=sys.stderr)
        seen[n] = g.detach().float().cpu()

    one, many = opt.step_param, opt.step_params

    def step_param(p, grad, grad_norm=None):
        record(p, grad)
        return one(p, grad, grad_norm)

    def step_params(params, grads, *rest, **kws):
        for p, g in zip(params, grads):
            record(p, g)
        return many(params, grads, *rest, **kws)

    opt.step_param, opt.step_params = step_param, step_params
    loss = step_model(input_ids=x, labels=y, use_cache=False).loss
    loss.backward()
    for n, p in model.named_parameters():  # not fused: the gradients are in .grad until step()
        if p.grad is not None and n not in seen:
            seen[n] = p.grad.float().cpu()
    opt.step()
    loss = loss.detach()
    ctx = backend.LAST.get("ctx")
    plan = dict((ctx.stats if ctx else {}).get("joint", {}).get("plan_memory", {}))
    info = {"options": step_model.ufx_report["options"],
            "plan": {k: plan.get(k) for k in ("predicted_peak_h", "recompute", "offload", "offloaded_bytes")}}
    return float(loss), seen, info


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g - ref).norm() / ref.norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="zoo name (default r1-distill-qwen-1.5b; smoke tiny-qwen2)")
    ap.add_argument("--budget", default="7GiB", help="target_vram for apply_optimizations, or 'none'")
    ap.add_argument("--tiers", default="int4/int4", help="HybridAdamW state_precision/high_precision_tier ('' = "
                    "let apply_optimizations choose)")
    ap.add_argument("--pipeline", default=None, help="backend pipeline (default: what apply_optimizations builds)")
    ap.add_argument("--no-check", action="store_true", help="skip the before-training budget check")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--worst", type=int, default=12, help="how many of the worst parameters to print")
    ap.add_argument("--out", default=None, help="write every parameter's figures to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny-qwen2, seq 64, lower=eager")
    a = ap.parse_args(argv)
    from unsloth_fx.zoo import build_model

    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.smoke:
        print("error: no GPU; use --smoke for the CPU check", file=sys.stderr)
        return 2
    a.model = a.model or ("tiny-qwen2" if a.smoke else "r1-distill-qwen-1.5b")
    a.seq = a.seq or (64 if a.smoke else 2048)
    if a.smoke and a.budget == "7GiB":
        a.budget = "64MiB"
    torch.manual_seed(0)
    model = build_model(a.model, device=device, dtype=torch.bfloat16)
    model.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the bf16 weights every run starts from
    x, y = _batch(a.seq, a.batch, device)

    print("fp32 reference (eager, the bf16 weights upcast) ...", file=sys.stderr, flush=True)
    model.float()
    loss32, g32 = _eager_grads(model, x, y)
    model.to(torch.bfloat16).load_state_dict(state)
    model.zero_grad(set_to_none=True)
    print("eager bf16 ...", file=sys.stderr, flush=True)
    loss_bf, gbf = _eager_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"ours (budget {a.budget}) ...", file=sys.stderr, flush=True)
    loss_ours, gours, info = _our_grads(model, x, y, a)

    rows = []
    for n, ref in g32.items():
        e_bf = rel_err(gbf[n], ref) if n in gbf else float("nan")
        e_ours = rel_err(gours[n], ref) if n in gours else float("inf")
        rows.append({"param": n, "numel": ref.numel(), "err_eager_bf16": e_bf, "err_ours": e_ours,
                     "ratio": e_ours / e_bf if e_bf > 0 else float("inf")})
    missing = [r["param"] for r in rows if r["err_ours"] == float("inf")]
    extra = sorted(set(gours) - set(g32))
    ratios = [r["ratio"] for r in rows if r["ratio"] != float("inf")]
    rows.sort(key=lambda r: -r["ratio"])
    print(f"\n{a.model}, seq {a.seq}, batch {a.batch}, budget {a.budget}, tiers {a.tiers or 'chosen'}; "
          f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"pipeline: {info['options'].get('pipeline')}")
    print(f"plan: {info['plan']}")
    print(f"loss: fp32 {loss32:.5f}  eager bf16 {loss_bf:.5f}  ours {loss_ours:.5f}")
    print(f"parameters: {len(rows)}; gradients missing in ours: {len(missing)}; unexpected: {len(extra)}")
    if ratios:
        print(f"error ratio ours / eager bf16: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}, "
              f"over 2x: {sum(r > 2 for r in ratios)}, over 10x: {sum(r > 10 for r in ratios)}")
    print("\n| parameter | numel | rel. error eager bf16 | rel. error ours | ratio |\n|---|---:|---:|---:|---:|")
    for r in rows[:a.worst]:
        print(f"| {r['param']} | {r['numel']:,} | {r['err_eager_bf16']:.2e} | {r['err_ours']:.2e} | {r['ratio']:.2f} |")
    if missing:
        print("missing:", ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "loss": {"fp32": loss32, "eager_bf16": loss_bf, "ours": loss_ours},
                       "info": info, "missing": missing, "unexpected": extra, "params": rows}, f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
