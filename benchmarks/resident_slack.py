"""What the CUDA caching allocator adds to a model's resident bytes, measured against the model of it.

Builds the model on the GPU with random weights, then HybridAdamW's state (``init_state()``: what
its first step allocates) with the state in one arena and with one allocation per state tensor,
each in a fresh process. Prints, for each, the bytes ``torch.cuda.memory_allocated`` counts beyond
the tensors' own bytes (rounded to 512 B), next to ``unsloth_fx.memory.allocator``'s block slack
for the same allocations (the figure ``plan_memory`` adds on CUDA).

    python3 benchmarks/resident_slack.py --model r1-distill-qwen-1.5b --tiers int4/int4     # GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MiB = 2**20


def measure(model: str, tiers: str, arena: bool) -> dict:
    import torch

    from unsloth_fx.memory import allocator as A
    from unsloth_fx.memory import model as M
    from unsloth_fx.optim import HybridAdamW
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    before = torch.cuda.memory_allocated()
    m = build_model(model, device="cuda", dtype=torch.bfloat16)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    sp, hp = (tiers.split("/") + [None])[:2]
    opt = HybridAdamW([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=1e-5,
                      state_precision=sp, high_precision_tier=hp or "fp32", state_arena=arena)
    after_params = torch.cuda.memory_allocated()
    opt.init_state()
    torch.cuda.synchronize()
    after_state = torch.cuda.memory_allocated()
    rows = [(p.numel(), p.dtype, True, False, n, tuple(p.shape)) for n, p in named]
    rows += [(b.numel(), b.dtype, False, True, n, tuple(b.shape)) for n, b in m.named_buffers()]
    st = M.static_breakdown(rows, opt, True)
    own = st.parameters + st.buffers + st.optimizer_state
    return {"model": model, "tiers": tiers, "state_arena": arena, "card": torch.cuda.get_device_name(),
            "torch": torch.__version__, "params_allocated": after_params - before,
            "allocated": after_state - before, "own_bytes": own, "measured_slack": after_state - before - own,
            "modelled_slack": A.block_slack(st.resident_requests), "state_bytes": opt.state_bytes(),
            "arena_bytes": opt.state_arena_bytes()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-qwen-1.5b")
    ap.add_argument("--tiers", default="int4/int4", help="state_precision[/high_precision_tier]")
    ap.add_argument("--one", choices=["arena", "per-tensor"], help=argparse.SUPPRESS)  # the worker
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.model, a.tiers, a.one == "arena")))
        return 0
    recs = []
    for one in ("per-tensor", "arena"):  # each in its own process: a fresh allocator
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--tiers", a.tiers, "--one", one],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        recs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = recs[0]
    print(f"{a.model}, HybridAdamW {a.tiers}, on {r0['card']} (torch {r0['torch']})\n")
    print("| state | allocated | tensors' own bytes | measured slack | modelled slack |")
    print("|---|---:|---:|---:|---:|")
    for r in recs:
        print(f"| {'one arena' if r['state_arena'] else 'one allocation per tensor'} | {r['allocated']:,} | "
              f"{r['own_bytes']:,} | {r['measured_slack'] / MiB:.2f} MiB | {r['modelled_slack'] / MiB:.2f} MiB |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
