"""FSDP2 on several GPUs: unsloth-fx vs stock FSDP2 + torch.compile AMP, in one run.

GPU (the lead runs this on a host with 2 GPUs; the script launches torchrun itself):

    python benchmarks/bench_fsdp.py --model r1-distill-qwen-7b --nproc 2 --seq 2048 --batch 1 \
        --steps 10 --warmup 3 --out fsdp_7b.json

Variants, each on a fresh model, one after the other in the same processes:

* ``stock``: fp32 parameters, ``fully_shard`` per decoder block + root with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``,
  ``torch.compile(model)`` (Inductor), ``torch.optim.AdamW(foreach)``.
* ``unsloth``: bf16 parameters, ``unsloth_fx.distributed.shard_model`` (same
  units), ``torch.compile(model, backend="unsloth", options={...})``,
  ``HybridAdamW(param_groups(model, --tier))``.

Per variant: peak ``torch.cuda.max_memory_allocated`` per GPU (bytes, every
rank), tokens/s over the timed steps (global tokens / wall seconds), losses.
A variant that runs out of memory is reported as ``"oom"`` with the message.

``--smoke``: CPU, gloo, 2 processes, tiny-qwen2, 2 steps, eager lowering (the
stock variant uses ``backend="aot_eager"`` and no mixed precision); checks that
the script runs, measures nothing worth recording.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="r1-distill-qwen-7b")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--tier", default="hybrid", help="HybridAdamW state_precision of the unsloth variant")
    ap.add_argument("--memory-budget", default=None, help="unsloth option memory_budget (e.g. 60GiB)")
    ap.add_argument("--variants", default="stock,unsloth")
    ap.add_argument("--out", default=None, help="JSON results (rank 0 writes)")
    ap.add_argument("--smoke", action="store_true")
    if argv is None and "UFX_FSDP_ARGV" in os.environ:  # a torchrun child: the parent's arguments
        argv = json.loads(os.environ["UFX_FSDP_ARGV"])
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.seq, a.batch, a.steps, a.warmup, a.nproc = "tiny-qwen2", 32, 1, 2, 1, 2
    return a


def _launch(a) -> int:
    """Re-run this script under torchrun with ``a.nproc`` processes."""
    env = dict(os.environ)
    if a.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    # the arguments travel in the environment: torchrun's parser (torch 2.11, Python 3.12) takes
    # "--nproc" after the script name for an abbreviation of its own --nproc-per-node
    env["UFX_FSDP_ARGV"] = json.dumps(sys.argv[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           os.path.abspath(__file__)]
    return subprocess.call(cmd, env=env)


def _run_variant(variant: str, a, device, mesh, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from unsloth_fx.distributed import shard_model
    from unsloth_fx.optim import HybridAdamW, param_groups
    from unsloth_fx.zoo import build_model

    cuda = device.type == "cuda"
    torch._dynamo.reset()
    torch.manual_seed(0)
    if variant == "stock":
        model = build_model(a.model, device=device, dtype=torch.float32, use_cache=False)
        mp = {} if a.smoke else {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                  reduce_dtype=torch.float32)}
        shard_model(model, mesh=mesh, **mp)
        compiled = torch.compile(model, backend="aot_eager" if a.smoke else "inductor")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    else:
        dtype = torch.float32 if a.smoke else torch.bfloat16
        model = build_model(a.model, device=device, dtype=dtype, use_cache=False)
        shard_model(model, mesh=mesh)
        options = {"lower": "eager" if a.smoke else "inductor"}
        if a.memory_budget:
            options["memory_budget"] = a.memory_budget
        compiled = torch.compile(model, backend="unsloth", options=options)
        opt = HybridAdamW(param_groups(model, a.tier), lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234 + rank)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    tokens = a.batch * a.seq * world * len(times)
    del compiled, model, opt
    return {"status": "ok", "peak_bytes_per_gpu": peaks, "tokens_per_s": tokens / sum(times) if times else None,
            "step_seconds": times, "losses": losses}


def main(argv=None) -> int:
    a = _args(argv)
    if "RANK" not in os.environ:
        return _launch(a)
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available() and not a.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    results = {"model": a.model, "world_size": world, "seq": a.seq, "batch_per_rank": a.batch, "steps": a.steps,
               "warmup": a.warmup, "tier": a.tier, "memory_budget": a.memory_budget, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke)",
               "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for v in a.variants.split(","):
        try:
            results["variants"][v] = _run_variant(v, a, device, mesh, rank, world)
        except torch.OutOfMemoryError as e:  # report, do not hide: the other variant still runs
            results["variants"][v] = {"status": "oom", "message": str(e).split("\n")[0]}
            torch.cuda.empty_cache()
        if rank == 0:
            print(v, json.dumps(results["variants"][v]), flush=True)
    if rank == 0:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
        for v, r in results["variants"].items():
            if r["status"] == "ok":
                peak = max(p for p in r["peak_bytes_per_gpu"]) if r["peak_bytes_per_gpu"][0] is not None else None
                print(f"| {a.model} | {world} x {results['device']} | {v} | "
                      f"{'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'} | {r['tokens_per_s']:.1f} tok/s | "
                      f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
            else:
                print(f"| {a.model} | {world} x {results['device']} | {v} | OOM | - | {r['message'][:80]} |")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
