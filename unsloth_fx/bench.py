"""``unsloth-fx bench``: the R1 benchmark suite, every variant in its own process, side by side.

    unsloth-fx bench --out bench_out                       # r1-distill-qwen-1.5b, default variants, 20 steps
    unsloth-fx bench --models r1-distill-qwen-1.5b,r1-distill-qwen-7b,deepseek-v3-mini --seq 2048
    unsloth-fx bench --variants compile-amp,ufx-7GiB --steps 200      # the loss target
    unsloth-fx bench --smoke --out /tmp/bench                 # CPU, tiny-qwen2, 2 steps (< 2 minutes)

One step = forward + loss + backward + optimizer step on ``batch x seq`` tokens of
the Python standard library's source (byte tokens, unsloth_fx.data), random init,
seed 0 (every variant sees the same batches). Per variant: peak =
``torch.cuda.max_memory_allocated()`` over all steps (bytes); step time = median of
the steps after the first two; tokens/s = batch * seq / step time; compile time =
first step's time - step time (seconds); loss = the loss of step N (and the curve).
A variant that runs out of memory is recorded as ``OOM``, one that crashes as
``crash`` with its last error line, one past ``--variant-timeout`` as ``timeout``;
the suite goes on. ``--suite-minutes`` stops starting new variants after that long
(the rest are recorded as ``skipped``). Writes ``bench.json``, ``bench.md``,
``bench.png`` to ``--out`` and prints the table last.

``--smoke`` only checks the machinery: CPU, tiny-qwen2, seq 64, 2 steps; the stock
"compile" variants use ``backend="aot_eager"`` and unsloth-fx ``lower="eager"``
(Inductor on CPU takes about a minute per graph), and no peak is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

GiB = 2**30

# name -> (description, settings). Settings: weights fp32+autocast ("amp") or bf16; compile: None | "inductor";
# extra: activation_memory_budget, gradient checkpointing, peers, unsloth-fx budget.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "eager-amp": ("eager, fp32 weights + bf16 autocast, torch AdamW(fused)", {"amp": True}),
    "eager-bf16": ("eager, bf16 weights and AdamW state", {}),
    "compile-amp": ("torch.compile (Inductor), AMP", {"amp": True, "compile": True}),
    "compile-bf16": ("torch.compile (Inductor), bf16", {"compile": True}),
    "compile-bf16-amb0.3": ("torch.compile, bf16, activation_memory_budget=0.3", {"compile": True, "amb": 0.3}),
    "eager-bf16-gc": ("eager, bf16, transformers gradient checkpointing", {"gc": True}),
    "compile-amp-gc": ("torch.compile, AMP, transformers gradient checkpointing", {"amp": True, "compile": True,
                                                                                   "gc": True}),
    "peers-liger-adamw8bit": ("eager bf16, Liger kernels + torchao AdamW8bit", {"liger": True, "adamw8bit": True}),
    "peers-compile-adamw8bit": ("torch.compile, bf16, torchao AdamW8bit", {"compile": True, "adamw8bit": True}),
    "ufx-7GiB": ("unsloth-fx, budget 7 GiB, HybridAdamW (fused into backward when available)", {"ufx": "7GiB"}),
    "ufx-8GiB": ("unsloth-fx, budget 8 GiB, HybridAdamW", {"ufx": "8GiB"}),
    "ufx-12GiB": ("unsloth-fx, budget 12 GiB, HybridAdamW", {"ufx": "12GiB"}),
    "ufx-24GiB": ("unsloth-fx, budget 24 GiB, HybridAdamW", {"ufx": "24GiB"}),
    # r1-distill-qwen-7b at seq 4096: the CPU planner's floor is 24.02 GiB at 8 chunks, 23.80 GiB at 16 (the fused
    # LM head's chunk buffers halve), so the 24 GiB target needs 16 (docs/end_to_end.md)
    "ufx-24GiB-16chunks": ("unsloth-fx, budget 24 GiB, HybridAdamW, 16 token chunks", {"ufx": "24GiB", "chunks": 16}),
    # the same with the tier the early check picks there (int4/int4) fixed and no early check: the check and its
    # tier ladder take minutes on the 7B (docs/memory.md, "Planner time"); the compile's plan_memory still
    # plans for 24 GiB and refuses it if it does not fit. layer_checkpoints=first: on the CPU planner the unpinned
    # time-optimal rounds all miss 24 GiB there (the residual stream's recompute chains the layers) and the rounds
    # with the layer boundaries pinned fit (24.00 GiB, ~409 ms estimated overhead per step against 1037 ms for the
    # fewest-device-bytes plan), so the compile tries those first
    # margin 0.2% (49 MiB at 24 GiB): after the allocator's block slack was modelled, the plan's error on the two
    # H100 graphs measured was within 3.2 MiB (docs/memory.md, fourteenth session); without it the plan lands 3.8 MiB
    # under the budget
    "ufx-24GiB-16chunks-int4": ("unsloth-fx, budget 24 GiB, HybridAdamW int4/int4, 16 token chunks, no early check, "
                                "layer boundaries pinned first (plan_memory layer_checkpoints=first), margin 0.2%",
                                {"ufx": "24GiB", "chunks": 16, "tiers": "int4/int4", "check": False,
                                 "pipeline": "default,plan_memory{optimizer={OPTIMIZER},layer_checkpoints=first,"
                                             "margin=0.002},"
                                             "+split_token_chunks{chunks=16},+fuse_linear_cross_entropy{chunks=16}"}),
}
# Loss ablation of the 7 GiB plan (issue 8): its tier (int4/int4) and 8 chunks fixed, one numeric choice changed
# each, no early check (the plan still gets the 7 GiB budget). "ufx-7GiB-int4" is the control: the pipeline
# apply_optimizations built for 7 GiB until the eleventh session, written out (since then it leaves the MLPs
# unchunked when that fits, as ufx-7GiB-int4-lmhead below).
_CHUNK_PIPE = "default,plan_memory{{optimizer={{OPTIMIZER}}}}{noacc},+split_token_chunks{{chunks=8}},"\
              "+fuse_linear_cross_entropy{{chunks=8{lce}}}"
_ABLATION = {
    "ufx-7GiB-int4": ("control: the 7 GiB pipeline and tier, fixed", "", ""),
    "ufx-7GiB-lmfp32": ("LM-head weight gradient summed in fp32 across chunks", "", ",grad_weight_accum=fp32"),
    "ufx-7GiB-noacc": ("chunked MLP weight gradients summed at the end, not as bf16 running sums",
                       ",chunk_recompute{accumulate=false}", ""),
    "ufx-7GiB-fp32sums": ("both of the above (the numerics of ab98e03)", ",chunk_recompute{accumulate=false}",
                          ",grad_weight_accum=fp32"),
}
for _name, (_what, _noacc, _lce) in _ABLATION.items():
    VARIANTS[_name] = (f"unsloth-fx 7 GiB, int4/int4, 8 chunks, ablation: {_what}",
                       {"ufx": "7GiB", "tiers": "int4/int4", "check": False,
                        "pipeline": _CHUNK_PIPE.format(noacc=_noacc, lce=_lce)})
VARIANTS["ufx-7GiB-nooffload"] = ("unsloth-fx 7 GiB, int4/int4, 8 chunks, ablation: offload off (recompute only)",
                                  {"ufx": "7GiB", "tiers": "int4/int4", "check": False,
                                   "pipeline": _CHUNK_PIPE.format(noacc="", lce="").replace(
                                       "{OPTIMIZER}}", "{OPTIMIZER},offload=false}")})
# the 7 GiB plan with only the LM head + CE chunked (what apply_optimizations builds for 7 GiB since the eleventh
# session, written out); the MLPs are left to plan_memory's recompute. On the CPU
# planner (2026-12-07) it fits 7 GiB (predicted 6.99 GiB, 2,982 recomputes) with 756 matmuls in the backward
# graph against 2,520 for ufx-7GiB-int4 (8,194 nodes against 17,392): the chunked MLPs multiply the kernel launches
VARIANTS["ufx-7GiB-int4-lmhead"] = ("unsloth-fx 7 GiB, int4/int4, LM head + CE in 8 chunks, MLPs not chunked",
                                    {"ufx": "7GiB", "tiers": "int4/int4", "check": False,
                                     "pipeline": "default,plan_memory{optimizer={OPTIMIZER}},"
                                                 "+fuse_linear_cross_entropy{chunks=8}"})
# the same graph planned to 97.5% of the budget (plan_memory{margin=0.025}): on an H100 (2026-12-07)
# ufx-7GiB-int4-lmhead measured 7.07 GiB against 6.99 GiB predicted
VARIANTS["ufx-7GiB-int4-lmhead-m025"] = ("unsloth-fx 7 GiB, int4/int4, LM head + CE in 8 chunks, MLPs not chunked, "
                                         "planned to 97.5% of the budget",
                                         {"ufx": "7GiB", "tiers": "int4/int4", "check": False,
                                          "pipeline": "default,plan_memory{optimizer={OPTIMIZER},margin=0.025},"
                                                      "+fuse_linear_cross_entropy{chunks=8}"})
VARIANTS["ufx-chunked-nobudget-int4"] = ("unsloth-fx, no budget, 8 chunks, int4/int4 (ablation: chunking alone)",
                                         {"ufx": "none", "tiers": "int4/int4", "check": False,
                                          "pipeline": _CHUNK_PIPE.format(noacc="", lce="")})
VARIANTS["ufx-nobudget-int4"] = ("unsloth-fx, no budget, no chunking, int4/int4 (ablation: the tier alone)",
                                 {"ufx": "none", "tiers": "int4/int4", "check": False,
                                  "pipeline": "default,plan_memory{optimizer={OPTIMIZER}}"})
# Ordered so that what the targets compare against runs first (--suite-minutes may cut the tail).
DEFAULT_VARIANTS = ("compile-amp", "ufx-7GiB", "eager-amp", "eager-bf16", "compile-bf16", "compile-bf16-amb0.3",
                    "eager-bf16-gc", "peers-liger-adamw8bit", "ufx-12GiB", "ufx-24GiB")
SMOKE_VARIANTS = ("eager-amp", "compile-bf16", "peers-liger-adamw8bit", "ufx-7GiB")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- worker (one variant, one process)


def _missing_peers(s: dict[str, Any]) -> list[str]:
    import importlib.util

    need = (["liger_kernel"] if s.get("liger") else []) + (["torchao"] if s.get("adamw8bit") else [])
    return [m for m in need if importlib.util.find_spec(m) is None]


@contextlib.contextmanager
def timed_section(wait_note_s: float = 30.0):
    """Hold an exclusive lock on the file $UFX_BENCH_LOCK while timing, so benchmark processes
    sharing one GPU never time at once (compilation stays outside); a no-op when unset.
    ``benchmarks/_lock.py`` uses this too.

    The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to this process
    alone, so it is gone when the process ends, even if a child forked while it was held (a
    compile worker, say) lives on. An ``flock`` lock is shared with such a child and outlives a
    killed holder. After ``wait_note_s`` seconds of waiting, a line on stderr says so."""
    path = os.environ.get("UFX_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a+") as f:
        t0, noted = time.monotonic(), False
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not noted and time.monotonic() - t0 > wait_note_s:
                    print(f"unsloth-fx bench: waiting for the GPU timing lock {path} (pid {os.getpid()}, "
                          f"{time.monotonic() - t0:.0f} s so far)", file=sys.stderr, flush=True)
                    noted = True
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def ufx_arguments(s: dict[str, Any], smoke: bool = False) -> tuple[str | None, dict[str, Any]]:
    """(target_vram, other keyword arguments) for ``apply_optimizations`` from an unsloth-fx variant's settings
    (``VARIANTS[name][1]``); ``benchmarks/peak_snapshot.py --variant`` builds the same step."""
    extra: dict[str, Any] = {"lower": "eager"} if smoke else {}
    budget = None if s["ufx"] == "none" else "64MiB" if smoke else s["ufx"]  # tiny model: a budget it can meet
    if s.get("tiers"):
        sp, hp = s["tiers"].split("/")
        extra["optimizer_options"] = {"state_precision": sp, "high_precision_tier": hp}
    if s.get("pipeline"):
        extra["pipeline"] = s["pipeline"]
    if s.get("chunks"):
        extra["chunks"] = s["chunks"]
    extra["check"] = s.get("check", True)
    return budget, extra


def run_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one variant in this process; returns its record (raises on OOM / errors)."""
    import torch._functorch.config as fc

    # The amb variants set torch's process-wide activation_memory_budget; the lazy compile reads it at step 0, so
    # it stays set through the steps and is put back afterwards: a caller running variants in its process keeps its own.
    amb_before = fc.activation_memory_budget
    try:
        return _run_variant(cfg)
    finally:
        fc.activation_memory_budget = amb_before


def _run_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from unsloth_fx.data import byte_tokens, lm_batches, stdlib_corpus
    from unsloth_fx.zoo import build_model

    name, smoke = cfg["variant"], cfg["smoke"]
    s = VARIANTS[name][1]
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    dtype = torch.float32 if s.get("amp") else torch.bfloat16
    model = build_model(cfg["model"], device=device, dtype=dtype)
    model.train()
    if s.get("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.get("liger"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    lr = cfg["lr"]
    report: dict[str, Any] = {}
    if s.get("ufx"):
        from unsloth_fx.api import apply_optimizations

        budget, extra = ufx_arguments(s, smoke)
        t_setup = time.perf_counter()
        step_model, opt = apply_optimizations(model, target_vram=budget, optimizer="hybrid_adam", lr=lr,
                                              seq_len=cfg["seq"], batch_size=cfg["batch"], **extra)
        setup_s = time.perf_counter() - t_setup
        _say(f"    apply_optimizations: {setup_s:.1f} s (the early check; the compile comes with step 1)")
        report = dict(step_model.ufx_report, setup_s=setup_s)
    else:
        if s.get("adamw8bit"):
            from torchao.optim import AdamW8bit

            opt = AdamW8bit(model.parameters(), lr=lr, bf16_stochastic_round=dtype == torch.bfloat16)
        else:
            fused = device.type == "cuda"
            opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused or None)
        step_model = model
        if s.get("compile"):
            if s.get("amb"):
                import torch._functorch.config as fc  # stock torch's knob, not our backend: set it as a user would

                fc.activation_memory_budget = s["amb"]
            step_model = torch.compile(model, backend="aot_eager" if smoke else "inductor")
    toks = byte_tokens(stdlib_corpus(max_bytes=max(cfg["batch"] * cfg["seq"] * (cfg["steps"] + 1) * 2, 1 << 20)))
    batches = lm_batches(toks, cfg["batch"], cfg["seq"], seed=0, epochs=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    times, losses = [], []
    lock = timed_section()
    for i in range(cfg["steps"]):
        if i == 1:  # step 0 compiles (host work); the timed steps hold the GPU lock, if any
            lock.__enter__()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(s.get("amp"))):
            loss = step_model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # syncs: the step is done
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        _say(f"    step {i + 1}/{cfg['steps']}  loss {losses[-1]:.4f}  {times[-1]:.3f} s")
    if cfg["steps"] > 1:
        lock.__exit__(None, None, None)
    if s.get("ufx"):  # what the compiled plan chose (the last compiled graph's plan_memory stats)
        from unsloth_fx import backend

        ctx = backend.LAST.get("ctx")
        pm = (ctx.stats if ctx else {}).get("joint", {}).get("plan_memory", {})
        report = dict(report, plan={k: pm.get(k) for k in ("predicted_peak_h", "recompute", "offload",
                                                           "offloaded_bytes")})
    steady = times[2:] or times[-1:]
    step_s = statistics.median(steady)
    return {
        "status": "ok", "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "step_s": step_s, "tokens_per_s": cfg["batch"] * cfg["seq"] / step_s,
        "compile_s": max(times[0] - step_s, 0.0), "loss": losses[-1], "losses": losses,
        "ufx": report or None,
    }


# torch's advice lines that end many exception messages (BackendCompilerFailed ends with two of them)
_HINTS = ("Set TORCHDYNAMO_VERBOSE", "For even more developer context", "You can suppress this exception",
          "See https://", "To execute this test, run")


def error_line(e: BaseException) -> str:
    """The line of ``str(e)`` that says what went wrong: the last one that is not torch's advice
    (``BackendCompilerFailed`` wraps the backend's own error, e.g. ``InfeasibleBudget: ...``, above
    two lines of it)."""
    lines = [t.strip() for t in str(e).splitlines() if t.strip()]
    real = [t for t in lines if not t.startswith(_HINTS)]
    return (real or lines or [type(e).__name__])[-1]


def stack_watchdog(file: Any, after: float, every: float | None = None) -> threading.Thread:
    """Write every thread's stack to ``file`` ``after`` seconds from now (then each ``every`` seconds, if given),
    from a daemon Python thread.

    Not ``faulthandler.dump_traceback_later``: its C watchdog reads the other threads' frames without the GIL,
    and a worker busy in Python dies of it (in CI, 2026-12-07, a worker segfaulted at the dump; a loop of
    dumps 10 ms apart kills a small training loop within seconds). This thread takes the GIL, so the frames
    it reads are still. The price: a main thread that never lets go of the GIL is never dumped here; the
    orchestrator's SIGUSR1 (``faulthandler.register``) is still sent before the kill for that case."""
    import faulthandler

    def run() -> None:
        time.sleep(after)
        while True:
            faulthandler.dump_traceback(file=file, all_threads=True)
            file.flush()
            if every is None:
                return
            time.sleep(every)

    t = threading.Thread(target=run, name="ufx-stack-watchdog", daemon=True)
    t.start()
    return t


def _worker(path: str) -> int:
    import faulthandler

    cfg = json.load(open(path))
    # a variant past its timeout must say where it was. The orchestrator sends SIGUSR1 before the kill, and the
    # worker also dumps by itself at a deadline just before it (a watchdog thread: it needs no signal, which a
    # library may take over, and no pipe): every thread's stack lands in a file the orchestrator appends to the
    # variant's log. (On the H100, 2026-12-07, a worker past its timeout left no stacks after SIGUSR1 alone.)
    stacks = open(cfg["stacks"], "w") if cfg.get("stacks") else sys.stderr
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    if cfg.get("dump_after"):
        stack_watchdog(stacks, float(cfg["dump_after"]))
    try:
        rec = run_variant(cfg)
    except Exception as e:  # noqa: BLE001 - classify, record, let the suite continue
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        rec = {"status": "OOM" if oom else "crash", "error": f"{type(e).__name__}: {error_line(e)}"[:400]}
        import traceback

        traceback.print_exc()
    with open(cfg["result"], "w") as f:
        json.dump(rec, f, default=str)
    return 0


# ----------------------------------------------------------------------------- orchestrator


def _run_in_subprocess(cfg: dict[str, Any], out: str, timeout: float) -> dict[str, Any]:
    tag = f"{cfg['model']}__{cfg['variant']}"
    cfg_path, cfg["result"] = os.path.join(out, f"{tag}.cfg.json"), os.path.join(out, f"{tag}.result.json")
    log_path = os.path.join(out, f"{tag}.log")
    cfg["stacks"], cfg["dump_after"] = os.path.join(out, f"{tag}.stacks"), max(timeout - 5.0, 1.0)
    for f in (cfg["result"], cfg["stacks"]):
        if os.path.exists(f):
            os.remove(f)
    json.dump(cfg, open(cfg_path, "w"))
    env = dict(os.environ)
    env.setdefault("TORCH_LOGS", "recompiles")  # a recompile inside the timed steps is worth a line in the log
    if cfg["smoke"]:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.pop("TRITON_INTERPRET", None)  # HybridAdamW's pure-PyTorch path on CPU; the interpreter is far slower
    t0 = time.perf_counter()
    tail: list[str] = []
    last_step: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "unsloth_fx.bench", "--worker", cfg_path], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

        def pump() -> None:  # a silent worker must not keep the timeout from firing, so read in a thread
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail[:] = (tail + [line.rstrip()])[-30:]
                if line.startswith("    step "):
                    last_step[:] = [line.strip()]
                    _say(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGUSR1)  # the worker's faulthandler writes every thread's stack to the log
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        if timed_out and os.path.exists(cfg["stacks"]):  # the worker's own dumps: at its deadline, then SIGUSR1's
            log.write(f"--- the worker's stacks (at {cfg['dump_after']:.0f} s, then at the kill signal) ---\n")
            log.write(open(cfg["stacks"]).read())
    wall = time.perf_counter() - t0
    if timed_out:
        rec = {"status": "timeout", "error": f"no result after {timeout:.0f} s"
               + (f" (last: {last_step[0]})" if last_step else "") + "; the log ends with the worker's stacks"}
    elif os.path.exists(cfg["result"]):
        rec = json.load(open(cfg["result"]))
    else:  # killed (e.g. a CUDA abort or the OOM killer): its last line says why
        errs = [t for t in tail if t.strip()]
        oom = any("out of memory" in t.lower() for t in errs)
        rec = {"status": "OOM" if oom else "crash",
               "error": (errs[-1] if errs else f"exit code {proc.returncode}")[:400]}
    rec["wall_s"] = wall
    rec["log"] = log_path
    return rec


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit == "GiB":
        return f"{v / GiB:.2f}"
    if unit == "int":
        return f"{v:,.0f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [f"unsloth-fx bench: {m['device']}, torch {m['torch']}, transformers {m['transformers']}, {m['date']}; "
             f"batch {m['batch']} x seq {m['seq']}, {m['steps']} steps, lr {m['lr']}"
             + (" (SMOKE: CPU machinery check, not a measurement)" if m["smoke"] else ""), "",
             "| model | variant | status | peak GiB | tokens/s | setup s | compile s | loss@N |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        ok = r["status"] == "ok"
        status = r["status"] if ok else f"{r['status']}: {r.get('error', '')}".replace("|", "/")
        setup = (r.get("ufx") or {}).get("setup_s")  # apply_optimizations (its early check); stock variants: none
        lines.append(f"| {r['model']} | {r['variant']} | {status} | {_fmt(r.get('peak_bytes'), 'GiB') if ok else ''} | "
                     f"{_fmt(r.get('tokens_per_s'), 'int') if ok else ''} | {_fmt(setup) if ok and setup else ''} | "
                     f"{_fmt(r.get('compile_s')) if ok else ''} | {_fmt(r.get('loss')) if ok else ''} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["status"] == "ok"]
    labels = [f"{r['model']}\n{r['variant']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 1.2 * len(rows) * 3), 4.5))
    for ax, key, title, scale in ((axes[0], "peak_bytes", "peak memory (GiB)", GiB),
                                  (axes[1], "tokens_per_s", "tokens/s", 1), (axes[2], "loss", "loss after N steps", 1)):
        vals = [(r.get(key) or 0) / scale for r in rows]
        ax.bar(range(len(rows)), vals, color=["tab:orange" if "ufx" in r["variant"] else "tab:blue" for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"unsloth-fx bench ({doc['meta']['device']}, {doc['meta']['steps']} steps)"
                 + (" SMOKE" if doc["meta"]["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unsloth-fx bench", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated zoo names (default r1-distill-qwen-1.5b; "
                    "also r1-distill-qwen-7b, deepseek-v3-mini)")
    ap.add_argument("--variants", default=None, help=f"comma-separated, from: {', '.join(VARIANTS)}; 'all' for every one "
                    f"(default: {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 20; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; smoke 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--variant-timeout", type=float, default=300.0, help="seconds per variant before it is killed")
    ap.add_argument("--suite-minutes", type=float, default=None,
                    help="start no new variant after this many minutes (the rest: 'skipped')")
    ap.add_argument("--smoke", action="store_true", help="CPU machinery check: tiny-qwen2, 2 steps")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        return _worker(a.worker)
    import torch
    import transformers

    models = (a.models or ("tiny-qwen2" if a.smoke else "r1-distill-qwen-1.5b")).split(",")
    vnames = list(VARIANTS) if a.variants == "all" else \
        (a.variants.split(",") if a.variants else list(SMOKE_VARIANTS if a.smoke else DEFAULT_VARIANTS))
    bad = [v for v in vnames if v not in VARIANTS]
    if bad:
        _say(f"error: unknown variant(s) {bad}; valid: {', '.join(VARIANTS)}")
        return 2
    from unsloth_fx.zoo import list_models

    badm = [m for m in models if m not in list_models()]
    if badm:
        _say(f"error: unknown model(s) {badm}; valid: {', '.join(list_models())}")
        return 2
    if not a.smoke and not torch.cuda.is_available():
        _say("error: unsloth-fx bench measures GPU memory and needs CUDA; use --smoke for a CPU check")
        return 2
    steps = a.steps or (2 if a.smoke else 20)
    seq = a.seq or (64 if a.smoke else 2048)
    os.makedirs(a.out, exist_ok=True)
    meta = {"device": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "steps": steps,
            "seq": seq, "batch": a.batch, "lr": a.lr, "smoke": a.smoke, "models": models, "variants": vnames}
    results: list[dict[str, Any]] = []
    t_suite = time.perf_counter()
    total = len(models) * len(vnames)
    k = 0
    for model in models:
        for v in vnames:
            k += 1
            rec: dict[str, Any] = {"model": model, "variant": v, "description": VARIANTS[v][0]}
            missing = _missing_peers(VARIANTS[v][1])
            elapsed = (time.perf_counter() - t_suite) / 60
            if missing:
                rec.update(status="not installed", error=", ".join(missing))
            elif a.suite_minutes is not None and elapsed > a.suite_minutes:
                rec.update(status="skipped", error=f"suite past {a.suite_minutes} min")
            else:
                _say(f"[{k}/{total}] {model} {v}: {VARIANTS[v][0]}")
                cfg = {"model": model, "variant": v, "steps": steps, "seq": seq, "batch": a.batch, "lr": a.lr,
                       "smoke": a.smoke}
                rec.update(_run_in_subprocess(cfg, a.out, a.variant_timeout))
            ok = rec["status"] == "ok"
            _say(f"[{k}/{total}] {model} {v}: {rec['status']}"
                 + (f"  peak {_fmt(rec.get('peak_bytes'), 'GiB')} GiB  {_fmt(rec.get('tokens_per_s'), 'int')} tok/s  "
                    f"loss {rec['loss']:.4f}" if ok else f"  {rec.get('error', '')}"))
            results.append(rec)
            doc = {"meta": meta, "results": results}
            with open(os.path.join(a.out, "bench.json"), "w") as f:  # after every variant: a crash keeps the rest
                json.dump(doc, f, indent=2, default=str)
    md = markdown(doc)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(md)
    plot(doc, os.path.join(a.out, "bench.png"))
    print(md, end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
