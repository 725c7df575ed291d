"""Chunked LM head + CE and chunked MLP recompute vs unchunked: peak memory, tokens/s and the recompute floor.

GPU (the lead runs this)::

    python benchmarks/bench_chunk.py --jobs 3 --out bench_chunk.json
    # r1-distill-qwen-1.5b, bf16, batch 1, seq 2048 and 8192; variants:
    #   unchunked  the default pipeline
    #   lm_head    only the LM head + cross-entropy chunked (fuse_linear_cross_entropy; no MLP split, no recompute)
    #   lm_head_rows  lm_head with the op's Triton row kernels (UNSLOTH_FX_LCE_KERNEL=triton, runtime/ce_rows.py)
    #   chunked    lm_head + split_token_chunks + chunk_recompute (MLPs / MoE blocks recomputed chunk by chunk)
    #   liger      liger_kernel's fused linear CE (Qwen2 models, if it imports)
    # then the largest sequence that fits in --fit-limit (default 16GiB) for each variant.
    python benchmarks/bench_chunk.py --model deepseek-v3-mini --jobs 3 --out bench_chunk_moe.json

CPU smoke run (tiny-qwen2 and the MoE tiny-deepseek-v3, eager lowering, no memory numbers)::

    python benchmarks/bench_chunk.py --smoke --out /tmp/bench_chunk.json

Each measurement runs in its own subprocess, so compile caches and the CUDA
caching allocator never carry over. A step is forward + backward with random
token ids as labels; no optimizer (it does not change between variants), grads
set to None between steps. Peak memory is ``torch.cuda.max_memory_allocated``
over the timed steps (bytes); tokens/s counts batch x seq tokens per step.

**Recompute floor** (:func:`flop_floor`, by arithmetic from the model's parameters, not measured): the
forward FLOPs chunked recompute runs again in the backward divided by the FLOPs of the unchunked step.
Step = 3 x forward (backward = 2 x forward); forward = 2 x tokens x matmul parameters active per token
(2-D weights, the LM head, routed experts scaled by top_k / n_experts) + causal attention scores
(batch x seq^2 x heads x (d_qk + d_v) per layer). Recomputed per MLP region: its matmuls except the
dense/shared down projection, whose output the backward does not need (gate + up; for MoE blocks also
the router and the routed experts' down projection, whose output the routing-weight gradient reads).
The lm_head variants recompute nothing (the fused op computes its gradients in the forward): floor 0.
The table prints each variant's slowdown vs unchunked next to its floor; the difference is overhead
beyond the recompute (smaller matmuls, extra kernels).

**Largest fitting sequence** (``--fit-limit``): each probe is one compile + one step in a subprocess
with ``torch.cuda.set_per_process_memory_fraction``. The search starts from the line through the
variant's measured peaks at the two shortest measured sequences (peak is linear in seq once the
logits are chunked or the attention is flash/efficient), probes the predicted largest multiple of
``--fit-step`` and steps by ``--fit-step`` from there until it has a fitting and a failing neighbour
(typically 2 probes); without two measured peaks it doubles from ``--fit-step`` and bisects.
Variants are searched in parallel (``--jobs``). The number of probes is printed and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lock import parallel_map, timed_section  # noqa: E402

VARIANTS = ("unchunked", "lm_head", "lm_head_rows", "chunked", "liger")


def _pipeline(variant: str, chunks: int) -> str:
    if variant in ("lm_head", "lm_head_rows"):
        return f"default,+fuse_linear_cross_entropy{{chunks={chunks}}}"
    if variant == "chunked":
        return (f"default,+split_token_chunks{{chunks={chunks}}},+fuse_linear_cross_entropy{{chunks={chunks}}},"
                f"chunk_recompute{{chunks={chunks}}}")
    return "default"


def child(a: argparse.Namespace) -> dict:
    """One variant at one sequence length; returns a JSON-able dict."""
    if a.variant == "lm_head_rows":  # read by the op (and the planner) when they run: set before the first step
        os.environ["UNSLOTH_FX_LCE_KERNEL"] = "triton"
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
    if a.variant in ("chunked", "lm_head", "lm_head_rows", "liger"):
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


def run_child(a: argparse.Namespace, variant: str, seq: int, mem_limit: int = 0, model: str | None = None,
              steps: int | None = None, warmup: int | None = None) -> dict:
    """One cell in a subprocess; its record is also printed (stderr) and appended to ``<out>.partial.jsonl``
    as soon as it ends, so a run cut short keeps what it measured."""
    rec = _run_child(a, variant, seq, mem_limit, model, steps, warmup)
    rec = {**rec, "mem_limit": mem_limit}
    print(f"  done {rec.get('model')} {variant} seq {seq}" + (f" (limit {mem_limit / 2**30:.1f} GiB)" if mem_limit else "")
          + (f": error {rec['error'][:120]}" if "error" in rec else
             f": peak {(rec.get('peak_bytes') or 0) / 2**30:.2f} GiB, {rec['tokens_per_s']:,.0f} tokens/s"),
          file=sys.stderr, flush=True)
    with open(a.out + ".partial.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def error_line(stderr: str) -> str:
    """The exception line of a child's traceback (``SomeError: message``), not its last line: torch's
    errors often end in a hint ("See https://...") that names no cause."""
    lines = stderr.strip().splitlines()
    for line in reversed(lines):
        if re.match(r"^(\w+\.)*[A-Z]\w*: ", line):
            return line
    return (lines or ["no output"])[-1]


def _run_child(a: argparse.Namespace, variant: str, seq: int, mem_limit: int = 0, model: str | None = None,
               steps: int | None = None, warmup: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--variant", variant, "--seq", str(seq),
           "--model", model or a.model, "--batch", str(a.batch), "--chunks", str(a.chunks), "--lower", a.lower,
           "--steps", str(steps or a.steps), "--warmup", str(warmup or a.warmup), "--mem-limit", str(mem_limit)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "seq": seq, "model": model or a.model, "error": f"timeout {a.timeout} s",
                "oom": False}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"variant": variant, "seq": seq, "model": model or a.model, "error": error_line(p.stderr)[:300],
            "oom": "out of memory" in p.stderr.lower()}


def flop_floor(model_name: str, batch: int, seq: int, variant: str) -> dict:
    """FLOPs of one unchunked training step and the forward FLOPs ``variant`` recomputes (module docstring).
    Counted from the parameters of the model built on meta: ``{"step_flops", "recompute_flops", "ratio"}``."""
    from unsloth_fx.zoo import build_model

    m = build_model(model_name, device="meta")
    c = m.config
    tokens = batch * seq
    experts = getattr(c, "n_routed_experts", None) or getattr(c, "num_local_experts", None) or 0
    top_k = getattr(c, "num_experts_per_tok", None) or 0
    active = recompute = 0.0
    for name, p in m.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        n = p.numel() * (top_k / experts if p.dim() == 3 and experts else 1.0)
        active += n
        if ".mlp." in name and ("down_proj" not in name or ".experts.down_proj" in name):
            recompute += n
    if getattr(c, "tie_word_embeddings", False):
        active += c.vocab_size * c.hidden_size  # the LM head matmul with the embedding's weight
    heads = c.num_attention_heads
    d_qk = getattr(c, "qk_head_dim", None) or getattr(c, "head_dim", None) or c.hidden_size // heads
    d_v = getattr(c, "v_head_dim", None) or d_qk
    attn = c.num_hidden_layers * batch * seq * seq * heads * (d_qk + d_v)  # QK^T + PV, 2 FLOPs/MAC, causal half
    step = 3 * (2 * tokens * active + attn)
    rec = 2 * tokens * recompute if variant == "chunked" else 0.0
    return {"step_flops": step, "recompute_flops": rec, "ratio": rec / step}


def _line_fit(a: argparse.Namespace, rows: list[dict], variant: str, model: str, limit: int) -> int | None:
    """Largest multiple of --fit-step under ``limit`` on the line through the two shortest measured peaks."""
    pts = sorted((r["seq"], r["peak_bytes"]) for r in rows
                 if r.get("variant") == variant and r.get("model", model) == model and r.get("peak_bytes"))
    if len(pts) < 2 or pts[1][0] == pts[0][0] or pts[1][1] <= pts[0][1]:
        return None
    (s0, p0), (s1, p1) = pts[:2]
    slope = (p1 - p0) / (s1 - s0)
    seq = s0 + (limit - p0) / slope
    return max(a.fit_step, min(a.fit_max, int(seq) // a.fit_step * a.fit_step))


def largest_fit(a: argparse.Namespace, variant: str, limit: int, start: int | None = None,
                model: str | None = None) -> tuple[int | None, int]:
    """(largest multiple of --fit-step whose step runs under ``limit`` bytes, probes run). From ``start``
    (a prediction): step by --fit-step towards the boundary; without one: doubling, then bisection."""
    probes = 0

    def fits(seq: int) -> bool:
        nonlocal probes
        probes += 1
        return "error" not in run_child(a, variant, seq, limit, model, steps=1, warmup=1)

    step = a.fit_step
    if start is not None:
        if fits(start):
            seq = start
            while seq + step <= a.fit_max and fits(seq + step):
                seq += step
            return seq, probes
        seq = start - step
        while seq >= step and not fits(seq):
            seq -= step
        return (seq if seq >= step else None), probes
    ok, lo, hi, seq = None, step, None, step
    while seq <= a.fit_max:
        if not fits(seq):
            hi = seq
            break
        ok, lo = seq, seq
        seq *= 2
    if hi is None:
        return ok, probes
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            ok, lo = mid, mid
        else:
            hi = mid
    return ok, probes


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
    ap.add_argument("--fit-variants", default="", help="variants searched for the largest fit (default: all measured)")
    ap.add_argument("--fit-step", type=int, default=1024)
    ap.add_argument("--fit-max", type=int, default=131072)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--jobs", type=int, default=1, help="cells compiling at once (timing stays serial)")
    ap.add_argument("--out", default="bench_chunk.json")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: tiny-qwen2 and tiny-deepseek-v3 (MoE), seq 64, eager, no fit search")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="unchunked", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--mem-limit", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(child(a)))
        return
    models = [a.model]
    if a.smoke:
        a.seqs, a.lower, a.fit_limit, a.steps, a.warmup, a.chunks = "64", "eager", "0", 2, 1, 4
        models = ["tiny-qwen2", "tiny-deepseek-v3"]
    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except ImportError:
        have_liger = False
    from unsloth_fx.options import format_bytes, parse_bytes
    from unsloth_fx.zoo import build_model

    def variants_for(model: str) -> list[str]:
        # Liger's patch used here is Qwen2's (apply_liger_kernel_to_qwen2).
        qwen2 = build_model(model, device="meta").config.model_type == "qwen2"
        return [v for v in a.variants.split(",") if v != "liger" or (have_liger and qwen2)]

    t0 = time.perf_counter()
    cells = [(m, v, int(s)) for m in models for s in a.seqs.split(",") for v in variants_for(m)]
    rows = parallel_map(lambda c: run_child(a, c[1], c[2], model=c[0]), cells, a.jobs)
    limit = parse_bytes(a.fit_limit) if a.fit_limit not in ("0", "") else 0
    fits: dict[str, dict] = {}
    if limit:
        vs = variants_for(a.model)
        if a.fit_variants:
            unknown = set(a.fit_variants.split(",")) - set(vs)
            if unknown:
                raise SystemExit(f"--fit-variants {','.join(sorted(unknown))}: not among the variants run ({','.join(vs)})")
            vs = [v for v in vs if v in a.fit_variants.split(",")]
        starts = {v: _line_fit(a, rows, v, a.model, limit) for v in vs}
        found = parallel_map(lambda v: largest_fit(a, v, limit, starts[v]), vs, a.jobs)
        fits = {v: {"seq": f[0], "probes": f[1], "predicted": starts[v]} for v, f in zip(vs, found)}
    elapsed = time.perf_counter() - t0
    for r in rows:
        if "error" not in r:
            r["flops"] = flop_floor(r["model"], a.batch, r["seq"], r["variant"])
    base = {(r["model"], r["seq"]): r["tokens_per_s"] for r in rows if r["variant"] == "unchunked" and "error" not in r}
    for m in models:
        print(f"\n{m}, batch {a.batch}, chunks {a.chunks}, lower={a.lower}"
              + ("" if have_liger else " (liger_kernel not importable: no liger column)"))
        print("| variant | seq | peak memory | tokens/s | slowdown vs unchunked | recompute floor | note |\n"
              "|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r.get("model", m) == m):
            peak = format_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "not measured (CPU)"
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
            ref = base.get((m, r["seq"]))
            slow = f"{ref / r['tokens_per_s'] - 1:+.1%}" if ref and "tokens_per_s" in r else "-"
            floor = f"+{r['flops']['ratio']:.1%}" if "flops" in r else "-"
            print(f"| {r['variant']} | {r['seq']} | {peak if 'error' not in r else '-'} | {tps} | {slow} | {floor} | "
                  f"{('OOM' if r.get('oom') else r['error']) if 'error' in r else ''} |")
    if fits:
        print(f"\nLargest seq (multiple of {a.fit_step}) fitting in {a.fit_limit}: "
              + ", ".join(f"{v}: {f['seq']} ({f['probes']} probes, predicted {f['predicted']})" for v, f in fits.items()))
    print(f"{len(cells)} cells + {sum(f['probes'] for f in fits.values())} fit probes in {elapsed:.0f} s")
    with open(a.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "rows": rows,
                   "largest_fit": fits, "fit_limit": a.fit_limit, "elapsed_s": elapsed}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
