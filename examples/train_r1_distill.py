"""Full-parameter training of DeepSeek-R1-Distill-Qwen-1.5B in a memory budget (the seed walkthrough).

    python examples/train_r1_distill.py                                  # GPU: 1.5B, 7 GiB, random init
    python examples/train_r1_distill.py --checkpoint /path/to/local/R1-Distill-Qwen-1.5B
    python examples/train_r1_distill.py --model tiny-qwen2 --steps 3     # CPU check (seconds)

1. load: random init from the zoo's published config, unless --checkpoint names a
   local directory (nothing is ever downloaded);
2. apply_optimizations at --target-vram: the budget is checked before training
   (InfeasibleBudget names the smallest budget that fits), then the model is
   compiled with the unsloth backend;
3. train with the hybrid-precision optimizer on real text that needs no download:
   the Python standard library's own source, as bytes (vocab 256, which any
   tokenizer's vocab covers; a real run would tokenize with the model's tokenizer).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="r1-distill-qwen-1.5b", help="a zoo name (random init)")
    ap.add_argument("--checkpoint", default=None, help="a local checkpoint directory (config.json + weights)")
    ap.add_argument("--target-vram", default="7GiB")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 64 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--checkpoint-dir", default=None, help="save (and with --resume, resume) training here")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)

    import unsloth_fx.api as ufx
    from unsloth_fx.data import byte_tokens, lm_batches, stdlib_corpus
    from unsloth_fx.trainer import Trainer
    from unsloth_fx.zoo import build_model, from_pretrained

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    seq = a.seq or (2048 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 weights + stochastic rounding on GPU
    torch.manual_seed(0)
    if a.checkpoint:
        model = from_pretrained(a.checkpoint, device=device, dtype=dtype)
    else:
        print(f"{a.model}: random init (pass --checkpoint DIR to start from local weights)", file=sys.stderr)
        model = build_model(a.model, device=device, dtype=dtype)
    model.config.use_cache = False

    extra = {} if cuda else {"lower": "eager"}  # Inductor on CPU compiles slowly; eager lowering runs the same graphs
    model, optimizer = ufx.apply_optimizations(model, target_vram=a.target_vram, optimizer="hybrid_adam", lr=a.lr,
                                               seq_len=seq, batch_size=a.batch, grad_accum=a.grad_accum, **extra)
    chk = model.ufx_report["check"]
    print(f"budget check: static {chk['static_peak'] / 2**30:.2f} GiB, smallest feasible "
          f"{(chk['smallest_feasible'] or 0) / 2**30:.2f} GiB; features {model.ufx_report['features']}",
          file=sys.stderr)

    tokens = byte_tokens(stdlib_corpus())
    need = a.steps * a.grad_accum
    it = lm_batches(tokens, a.batch, seq, seed=0, epochs=None)
    batches = [next(it) for _ in range(need)]
    trainer = Trainer(model, batches, optimizer=optimizer, max_steps=a.steps, grad_accum=a.grad_accum,
                      log_every=max(1, min(10, a.steps)), checkpoint_dir=a.checkpoint_dir, resume=a.resume)
    hist = trainer.train()
    print(f"trained {len(hist)} steps: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (target {a.target_vram})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
