"""What one HybridAdamW parameter update allocates beyond its gradient, measured against the
memory model's count (``unsloth_fx.memory.model._hybrid_step_temp``).

For each tier, a bf16 parameter of ``--numel`` elements (default: R1-Distill-Qwen-7B's embedding,
152,064 x 3,584) gets one warm-up ``step_param`` (allocates the state), then a measured one:
``torch.cuda.max_memory_allocated()`` during the call minus the bytes allocated before it. The
check_finite path reads the gradient's fp32 norm; this shows whether that costs a temporary.

    python3 benchmarks/step_temp.py            # CUDA only
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=152064 * 3584)
    ap.add_argument("--tiers", default="int4,int8,bf16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_temp.py measures CUDA allocations; no CUDA device here")
    from unsloth_fx.memory.model import _hybrid_step_temp
    from unsloth_fx.optim import HybridAdamW, state_tensor_nbytes

    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}; bf16 parameter of {args.numel:,} elements")
    print("| tier | check_finite | measured extra bytes in the step | model's step temporary |")
    print("|---|---|---:|---:|")
    for tier in args.tiers.split(","):
        for check in (True, False):
            p = torch.nn.Parameter(torch.zeros(args.numel, dtype=torch.bfloat16, device=dev))
            g = torch.randn(args.numel, dtype=torch.bfloat16, device=dev)
            opt = HybridAdamW([p], lr=1e-3, state_precision=tier, quantize_all=True, min_quant_numel=0,
                              check_finite=check)
            opt.step_param(p, g)  # allocates the state
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step_param(p, g)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            sizes = state_tensor_nbytes(tier, args.numel)
            model = _hybrid_step_temp(tier, args.numel, torch.bfloat16, sizes, check)
            print(f"| {tier} | {check} | {extra:,} | {model:,} |", flush=True)
            del p, g, opt
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
