"""Similar-weight sharing: detection time, and memory before/after apply on a planted model.

    python benchmarks/bench_share.py --out share.json                 # GPU (+ CPU detection timings)
    python benchmarks/bench_share.py --smoke --out /tmp/share.json    # tiny models, CPU only

Measures
1. detection time of ``find_shared`` on r1-distill-qwen-1.5b and deepseek-v3-mini with random
   weights (bf16), on CPU and on the GPU (seconds, wall clock, after a synchronize);
2. on deepseek-v3-mini with half of every MoE layer's routed experts planted as sign-permuted
   copies of the other half: parameter + buffer bytes, ``torch.cuda.memory_allocated`` after
   build, and peak memory of one AdamW training step, without and with ``apply_sharing``;
   the logits of the two models are compared (must be identical).

Writes JSON to ``--out`` and prints a markdown table. Random weights only: no real pretrained
transformer weights are available without a download (see docs/sharing.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch

from unsloth_fx.sharing import apply_sharing, find_shared, storage_bytes
from unsloth_fx.zoo import build_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * 0.02)


def time_detection(name: str, device: str, dtype: torch.dtype, overrides: dict) -> dict:
    model = build_model(name, device=device, dtype=dtype, **overrides)
    _init(model, 0)
    _sync(device)
    t0 = time.perf_counter()
    rep = find_shared(model, tolerance=0.01)
    _sync(device)
    sec = time.perf_counter() - t0
    out = {"model": name, "device": device, "dtype": str(dtype), "seconds": round(sec, 3), **rep.summary(),
           "overrides": overrides}
    del model, rep
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def plant_experts(model: torch.nn.Module, seed: int = 1) -> int:
    """Experts E/2..E-1 of every MoE layer := sign-permuted copies of experts 0..E/2-1. Returns pairs planted."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            gu = getattr(mod, "gate_up_proj", None)
            if not isinstance(gu, torch.nn.Parameter) or gu.dim() != 3:
                continue
            dn = mod.down_proj
            e_count, two_i, _ = gu.shape
            inter = two_i // 2
            for e in range(e_count // 2, e_count):
                src = e - e_count // 2
                perm = torch.randperm(inter, generator=g).to(gu.device)
                sign = (torch.randint(0, 2, (inter,), generator=g).float() * 2 - 1).to(gu.device, gu.dtype)
                gu[e, :inter] = gu[src, :inter][perm]
                gu[e, inter:] = gu[src, inter:][perm] * sign[:, None]
                dn[e] = dn[src][:, perm] * sign[None, :]
                n += 1
    return n


def step_memory(model: torch.nn.Module, ids: torch.Tensor, device: str) -> dict:
    """Peak bytes of forward + backward + one AdamW step (state created inside)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    _sync(device)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    out = {"loss": float(loss.detach()), "optimizer_state_bytes": state, "grad_bytes": grads}
    if device.startswith("cuda"):
        out["allocated_before_step"] = base
        out["peak_step"] = torch.cuda.max_memory_allocated()
        out["allocated_after_step"] = torch.cuda.memory_allocated()
    del opt
    return out


def planted_memory(name: str, device: str, dtype: torch.dtype, overrides: dict, seq: int) -> dict:
    res: dict = {"model": name, "device": device, "dtype": str(dtype), "seq": seq, "overrides": overrides}
    ids = torch.randint(0, 500, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    logits = {}
    for variant in ("planted", "shared"):
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            m0 = torch.cuda.memory_allocated()
        model = build_model(name, device=device, dtype=dtype, use_cache=False, **overrides)
        _init(model, 0)
        res["pairs_planted"] = plant_experts(model)
        rep = None
        if variant == "shared":
            t0 = time.perf_counter()
            rep = find_shared(model, tolerance=0.01)
            _sync(device)
            res["detect_seconds"] = round(time.perf_counter() - t0, 3)
            res["accepted"] = len(rep.accepted)
            res["accepted_expert_pairs"] = sum(c.kind == "expert" for c in rep.accepted)
            res["predicted_bytes_saved"] = rep.total_bytes_saved
            apply_sharing(model, rep)
            rep = None
            gc.collect()
        v = {"storage": storage_bytes(model)}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            v["allocated_model"] = torch.cuda.memory_allocated() - m0
        with torch.no_grad():
            logits[variant] = model(ids).logits.float().cpu()
        v["step"] = step_memory(model, ids, device)
        res[variant] = v
        del model
    res["logits_identical"] = bool(torch.equal(logits["planted"], logits["shared"]))
    res["logits_max_abs_diff"] = float((logits["planted"] - logits["shared"]).abs().max())
    sp, ss = res["planted"]["storage"], res["shared"]["storage"]
    res["realised_bytes_saved"] = sp["parameters"] + sp["buffers"] - ss["parameters"] - ss["buffers"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU (seconds)")
    ap.add_argument("--out", default="bench_share.json")
    ap.add_argument("--cpu-detect", action=argparse.BooleanOptionalAction, default=True,
                    help="also time detection on CPU (large models take minutes)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        detect = [("tiny-qwen2", {}), ("tiny-deepseek-v3", {})]
        planted = ("tiny-deepseek-v3", {"hidden_size": 256, "n_routed_experts": 8}, 16)
    else:
        detect = [("r1-distill-qwen-1.5b", {}), ("deepseek-v3-mini", {})]
        planted = ("deepseek-v3-mini", {}, 1024)
    devices = (["cpu"] if (args.cpu_detect or not cuda) else []) + (["cuda"] if cuda else [])
    result = {
        "torch": torch.__version__, "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if cuda else None, "smoke": args.smoke,
        "detection": [time_detection(n, d, dtype, o) for n, o in detect for d in devices],
    }
    pdev = "cuda" if cuda else "cpu"
    result["planted"] = planted_memory(planted[0], pdev, dtype, planted[1], planted[2])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "-"  # noqa: E731
    print(f"torch {result['torch']}, {result['gpu'] or 'CPU'}, {result['date']}\n")
    print("| model | device | detection s | candidates | screened | accepted |")
    print("|---|---|---|---|---|---|")
    for r in result["detection"]:
        print(f"| {r['model']} | {r['device']} | {r['seconds']:.2f} | {r['candidates']} | {r['screened']} | {r['accepted']} |")
    p = result["planted"]
    print(f"\nPlanted {p['model']} ({p['pairs_planted']} sign-permuted expert copies), {p['device']}, {p['dtype']}, "
          f"seq {p['seq']}: accepted {p['accepted']} ({p['accepted_expert_pairs']} expert pairs), "
          f"logits identical: {p['logits_identical']} (max |diff| {p['logits_max_abs_diff']:.3g})\n")
    print("| | planted | shared | saved |")
    print("|---|---|---|---|")
    rows = [("parameter bytes", lambda v: v["storage"]["parameters"]),
            ("buffer bytes", lambda v: v["storage"]["buffers"]),
            ("grad bytes", lambda v: v["step"]["grad_bytes"]),
            ("AdamW state bytes", lambda v: v["step"]["optimizer_state_bytes"])]
    if "allocated_model" in p["planted"]:
        rows += [("cuda allocated (model)", lambda v: v["allocated_model"]),
                 ("cuda peak (fwd+bwd+step)", lambda v: v["step"]["peak_step"]),
                 ("cuda allocated after step", lambda v: v["step"]["allocated_after_step"])]
    for label, get in rows:
        a, b = get(p["planted"]), get(p["shared"])
        print(f"| {label} | {mib(a)} | {mib(b)} | {mib(a - b)} |")
    print(f"\npredicted bytes saved {p['predicted_bytes_saved']}, realised {p['realised_bytes_saved']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
