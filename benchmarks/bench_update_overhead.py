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

Each (tier, grouping) is one row: ``per-param`` is one ``fused_adamw_step_`` call per parameter
(``fuse_optimizer{group_bytes=0}``), ``grouped`` one ``fused_adamw_steps_`` call per group of
consecutive parameters (reverse model order, as in backward) whose gradients fit ``--group-bytes``
(default: the pass's, 64 MiB), as ``fuse_optimizer`` emits by default. Prints a markdown table and
writes JSON. ``--device cpu`` is a smoke run (tiny shapes, the pure-PyTorch reference kernels unless
TRITON_INTERPRET=1): its host figures are CPU figures, not GPU ones.
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
        t = torch.nn.Parameter(torch.randn(shape, device=device if device != 'meta' else 'meta', dtype=torch.bfloat16) * 0.02)
        out.append((name, t))
    return out


def _groups(named, group_bytes: int) -> list[list[int]]:
    """Indices of ``named`` in backward order (reverse model order), grouped as the pass does."""
    from unsloth_fx.passes.fuse_optimizer import plan_groups

    order = list(reversed(range(len(named))))
    ups = [(k, i, None, named[i][1].numel() * named[i][1].element_size()) for k, i in enumerate(order)]
    return [[u[1] for u in g] for g in plan_groups(ups, group_bytes)]


def _time_fused(tier: str, named, grads, reps: int, group_bytes: int = 0) -> tuple[float, int]:
    """(median seconds of one pass over all parameters, update calls per pass)."""
    import torch

    from unsloth_fx import fusion
    from unsloth_fx.optim import HybridAdamW

    opt = HybridAdamW(named, lr=1e-5, state_precision=tier)
    params = [p for _, p in named]
    b = fusion.attach(params, opt)
    slots = [fusion.slot_for(p, b) for p in params]
    groups = _groups(named, group_bytes)
    if group_bytes > 0:
        op = torch.ops.unsloth_fx.fused_adamw_steps_
        calls = [([params[i] for i in g], [grads[i] for i in g], [named[i][0] for i in g], [slots[i] for i in g])
                 for g in groups]

        def updates():
            for ps, gs, names, ss in calls:
                op(ps, gs, names, ss, [])
    else:
        op = torch.ops.unsloth_fx.fused_adamw_step_
        extra = ([],) if len(op.default._schema.arguments) == 5 else ()  # newer op: the "after" list
        order = [i for g in groups for i in g]

        def updates():
            for i in order:
                op(params[i], grads[i], named[i][0], slots[i], *extra)

    def one_pass():
        updates()
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
    return statistics.median(times), len(groups)


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
    ap.add_argument("--group-bytes", type=int, default=None,
                    help="cap of the grouped rows (default: the fuse_optimizer pass's group_bytes)")
    ap.add_argument("--modes", default="per-param,grouped", help="per-param and/or grouped")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (tiny model)")
    a = ap.parse_args()
    import os
    import sys

    import torch

    from unsloth_fx.passes.fuse_optimizer import DEFAULT_GROUP_BYTES

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _lock import timed_section  # no two benchmark cells time at once (UFX_BENCH_LOCK)

    gb = DEFAULT_GROUP_BYTES if a.group_bytes is None else a.group_bytes
    if a.device == "cpu":
        _stub_kernels()
    rows = []
    with timed_section():
        for tier in a.tiers.split(","):
            for mode in a.modes.split(","):
                row = {"tier": tier, "mode": mode, "group_bytes": gb if mode == "grouped" else 0}
                for tiny in ((True, False) if a.device == "cuda" else (True,)):
                    named = _params(a.model, a.device, tiny)
                    grads = [torch.randn_like(p) * 1e-3 for _, p in named]
                    # the tiny stand-ins are grouped as the real shapes would be (same calls per step)
                    real = named if not tiny else _params(a.model, "meta", False)
                    dt, calls = _time_fused(tier, named, grads, a.reps, row["group_bytes"]) if not tiny else \
                        _time_tiny(tier, named, grads, a.reps, row["group_bytes"], real)
                    if tiny:
                        row["calls"] = calls
                        row["params"] = len(named)
                        row["host_us_per_param"] = dt / len(named) * 1e6
                    else:
                        row["step_ms"] = dt * 1e3
                    del named, grads
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
        named = _params(a.model, a.device, a.device != "cuda")
        grads = [torch.randn_like(p) * 1e-3 for _, p in named]
        torch_ms = _time_torch(named, grads, a.reps) * 1e3
        named_tiny = _params(a.model, a.device, True)
        grads_tiny = [torch.randn_like(p) * 1e-3 for _, p in named_tiny]
        torch_tiny = _time_torch(named_tiny, grads_tiny, a.reps)
    rows.append({"tier": "torch AdamW " + ("fused" if a.device == "cuda" else "foreach") + " (param-dtype state)",
                 "mode": "multi-tensor", "calls": 1, "params": len(named_tiny),
                 "host_us_per_param": torch_tiny / len(named_tiny) * 1e6,
                 "step_ms": torch_ms if a.device == "cuda" else float("nan")})
    print(f"{a.model}, {torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU (smoke: tiny shapes)'}, "
          f"torch {torch.__version__}, group_bytes {gb}")
    print("| update | mode | calls/step | host us per parameter | step ms (real shapes) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tier']} | {r['mode']} | {r['calls']} | {r['host_us_per_param']:.1f} | "
              f"{r.get('step_ms', float('nan')):.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _stub_kernels() -> None:
    """CPU smoke: the host path the GPU takes (uses_triton True) with every Triton launch a
    no-op, so the figure is the Python and torch-op cost around the kernels, not the interpreter's."""
    from unsloth_fx.runtime import adamw as K

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    K.uses_triton = lambda t: True
    K._adamw_kernel = K._adamw_multi_kernel = K._bookkeep_kernel = _NoLaunch()
    K.triton = K.triton or type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b)),
                                          "next_power_of_2": staticmethod(lambda n: 1 << (n - 1).bit_length())})


def _time_tiny(tier, named, grads, reps, group_bytes, real):
    """Host time with tiny stand-ins, grouped by the real shapes' gradient bytes."""
    import torch

    sizes = {n: p.numel() * 2 for n, p in real}  # bf16 gradients

    class _Sized:  # plan the groups on the real sizes, run them on the stand-ins
        def __init__(self, n):
            self.n = n

        def numel(self):
            return sizes[self.n]

        def element_size(self):
            return 1

    global _groups
    plain = _groups
    _groups = lambda nm, gb: plain([(n, _Sized(n)) for n, _ in nm], gb)  # noqa: E731
    try:
        return _time_fused(tier, named, grads, reps, group_bytes)
    finally:
        _groups = plain
        del torch


if __name__ == "__main__":
    raise SystemExit(main())
