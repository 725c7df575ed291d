"""Convergence of HybridAdamW against AdamW on real text (no download).

A Qwen2-architecture model (transformers.Qwen2ForCausalLM, ~63M parameters
by default, byte-level vocabulary of 256) is trained on the Python standard
library's own ``.py`` files (the directory of the ``os`` module, sorted,
concatenated as bytes; the last 5% of bytes are the validation split).

Variants (each for every seed):

* ``amp``       fp32 weights, bf16 autocast, torch AdamW(fused) fp32 state (reference)
* ``bf16``      bf16 weights and state, torch AdamW (negative control: updates
                below half a bf16 ulp are lost)
* ``hybrid``, ``int8``, ``int4``: bf16 weights, HybridAdamW with stochastic
                rounding and that ``state_precision`` (embeddings, LM head,
                norms, biases keep fp32 moments, the default policy)

GPU run:   python benchmarks/convergence.py --out-dir conv_out
CPU smoke: python benchmarks/convergence.py --smoke --out-dir /tmp/conv

Writes ``convergence.json`` and ``convergence.png`` (train/val curves) and
prints final losses (mean and spread over seeds), state bytes/param and tokens/s.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import time

import torch

VARIANTS = ("amp", "bf16", "hybrid", "int8", "int4")


def load_corpus(val_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of the stdlib's top-level .py files: (train, val) uint8 tensors."""
    root = os.path.dirname(os.__file__)
    data = b"".join(open(f, "rb").read() for f in sorted(glob.glob(os.path.join(root, "*.py"))))
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = int(len(t) * val_frac)
    return t[:-n_val], t[-n_val:]


def make_model(smoke: bool, seq: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if smoke:
        cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                          tie_word_embeddings=False, use_cache=False)
    else:
        cfg = Qwen2Config(vocab_size=256, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                          num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=seq,
                          tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq + 1] for i in idx.tolist()]).long()
        yield x


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def run_variant(variant, seed, args, train, val, device):
    from unsloth_fx.optim import HybridAdamW

    torch.manual_seed(seed)
    model = make_model(args.smoke, args.seq)
    if variant == "amp":
        model = model.to(device)
    else:
        model = model.to(device=device, dtype=torch.bfloat16)
    model.train()
    if variant in ("amp", "bf16"):
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=fused, foreach=None if fused else True)
    else:
        opt = HybridAdamW(model.named_parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                          state_precision=variant, stochastic_rounding=True, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant of a seed
    it = batches(train, args.batch, args.seq, gen)
    vgen = torch.Generator().manual_seed(7)
    val_batches = [next(batches(val, args.batch, args.seq, vgen)) for _ in range(args.val_batches)]

    def loss_of(x):
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=(variant == "amp")):
            out = model(input_ids=x[:, :-1])
        return torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate():
        model.eval()
        v = statistics.mean(loss_of(x).item() for x in val_batches)
        model.train()
        return v

    curve, vcurve = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        loss = loss_of(next(it))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            curve.append((step, loss.item()))
        if step % args.eval_every == 0 or step == args.steps - 1:
            vcurve.append((step, evaluate()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    nparam = sum(p.numel() for p in model.parameters())
    if isinstance(opt, HybridAdamW):
        sbpp = opt.state_bytes_per_param()
        extra = {"tiers": opt.tier_summary(), "nonfinite_skips": opt.nonfinite_skips()}
    else:
        sbpp = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                   if isinstance(t, torch.Tensor) and k != "step") / nparam
        extra = {}
    return {"variant": variant, "seed": seed, "train": curve, "val": vcurve, "final_val": vcurve[-1][1],
            "final_train": statistics.mean(v for _, v in curve[-5:]), "state_bytes_per_param": sbpp,
            "params": nparam, "seconds": dt, "tokens_per_s": args.steps * args.batch * args.seq / dt, **extra}


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not importable, no PNG written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(VARIANTS, ["black", "tab:red", "tab:blue", "tab:green", "tab:orange"]))
    for r in results:
        for ax, key in zip(axes, ("train", "val")):
            xs, ys = zip(*r[key])
            ax.plot(xs, ys, color=colors.get(r["variant"], "gray"), alpha=0.7, lw=1,
                    label=r["variant"] if r["seed"] == results[0]["seed"] else None)
    for ax, title in zip(axes, ("train loss", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-batches", type=int, default=None)
    ap.add_argument("--out-dir", default="convergence_out")
    args = ap.parse_args(argv)
    s = args.smoke
    args.steps = args.steps or (8 if s else 1000)
    args.batch = args.batch or (4 if s else 16)
    args.seq = args.seq or (64 if s else 256)
    args.warmup = args.warmup if args.warmup is not None else (2 if s else 50)
    args.eval_every = args.eval_every or (4 if s else 100)
    args.val_batches = args.val_batches or (2 if s else 8)
    seeds = [int(x) for x in (args.seeds or ("0" if s else "0,1,2")).split(",")]
    variants = [v for v in args.variants.split(",") if v]
    device = torch.device("cpu" if s or not torch.cuda.is_available() else "cuda")
    if not s and device.type != "cuda":
        raise SystemExit("convergence.py needs a CUDA GPU (use --smoke on CPU)")
    os.makedirs(args.out_dir, exist_ok=True)
    train, val = load_corpus()
    print(f"corpus: {len(train):,} train bytes, {len(val):,} val bytes; device {device}")
    results = []
    for seed in seeds:
        for v in variants:
            r = run_variant(v, seed, args, train, val, device)
            results.append(r)
            print(f"{v:7s} seed {seed}: val {r['final_val']:.4f}  train {r['final_train']:.4f}  "
                  f"{r['tokens_per_s']:,.0f} tok/s  {r['seconds']:.1f} s", flush=True)
    return write_summary(results, variants, vars(args), args.out_dir, device)


def write_summary(results, variants, args_dict, out_dir, device):
    """Print the table, write convergence.json and convergence.png into ``out_dir``."""
    seeds = sorted({r["seed"] for r in results})
    print(f"\nmodel: {results[0]['params'] / 1e6:.1f}M parameters; {args_dict['steps']} steps x "
          f"{args_dict['batch']} x {args_dict['seq']} tokens; seeds {seeds}")
    print("| variant | seeds | final val loss (mean) | min | max | state B/param | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        if not rs:
            continue
        vals = [r["final_val"] for r in rs]
        summary[v] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "seeds": len(rs),
                      "state_bytes_per_param": rs[0]["state_bytes_per_param"],
                      "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs)}
        m = summary[v]
        print(f"| {v} | {m['seeds']} | {m['mean']:.4f} | {m['min']:.4f} | {m['max']:.4f} | "
              f"{m['state_bytes_per_param']:.3f} | {m['tokens_per_s']:,.0f} |")
    out = {"args": args_dict, "torch": torch.__version__, "device": str(device),
           "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "summary": summary, "runs": results}
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "convergence.json")
    with open(jpath, "w") as f:
        json.dump(out, f, indent=1)
    png = os.path.join(out_dir, "convergence.png")
    wrote = plot(results, png)
    print(f"wrote {jpath}" + (f" and {png}" if wrote else ""))
    return out


def merge(dirs, out_dir):
    """Combine the convergence.json of several runs (e.g. one process per variant and seed)."""
    runs, args_dict = [], None
    for d in dirs:
        path = os.path.join(d, "convergence.json")
        if not os.path.exists(path):
            print(f"missing: {path} (that run did not finish)")
            continue
        with open(path) as f:
            data = json.load(f)
        runs.extend(data["runs"])
        args_dict = args_dict or data["args"]
    if not runs:
        raise SystemExit("no finished runs to merge")
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    return write_summary(runs, variants, args_dict, out_dir, "cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        merge(sys.argv[2:-1], sys.argv[-1])  # --merge DIR... OUT_DIR
    else:
        main()
