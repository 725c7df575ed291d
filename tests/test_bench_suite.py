"""The benchmark suite's machinery (unsloth-fx bench --smoke): subprocess per variant, OOM / crash / missing
peers recorded, JSON + markdown + PNG written, table printed last."""

import json

import pytest
import torch

from unsloth_fx import bench


@pytest.mark.slow
def test_smoke_suite_runs_variants_in_subprocesses_and_writes_everything(tmp_path, capsys):
    rc = bench.main(["--smoke", "--variants", "eager-amp,peers-liger-adamw8bit,ufx-7GiB", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.load(open(tmp_path / "bench.json"))
    by = {r["variant"]: r for r in doc["results"]}
    assert list(by) == ["eager-amp", "peers-liger-adamw8bit", "ufx-7GiB"]
    for v in ("eager-amp", "ufx-7GiB"):
        r = by[v]
        assert r["status"] == "ok", r
        assert len(r["losses"]) == 2 and r["loss"] == r["losses"][-1]
        assert r["loss"] == pytest.approx(6.24, abs=0.3)  # ~ln(512): tiny-qwen2 at random init
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] is None  # no peak on CPU
    assert by["ufx-7GiB"]["ufx"]["options"]["memory_budget"] == "64MiB"
    assert by["ufx-7GiB"]["ufx"]["check"]["feasible"] is True
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        assert by["peers-liger-adamw8bit"]["status"] == "not installed"
    md = (tmp_path / "bench.md").read_text()
    assert "| tiny-qwen2 | eager-amp | ok |" in md and "SMOKE" in md
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last


@pytest.mark.slow
def test_a_variant_past_its_timeout_is_killed_with_its_stacks_in_the_log(tmp_path):
    """A stalled variant (the 7 GiB run of 2026-12-06 printed step 1 and nothing in the next 219 s) must say
    where it was: before the kill, the worker's faulthandler writes every thread's stack to its log."""
    cfg = {"model": "tiny-qwen2", "variant": "eager-amp", "steps": 20000, "seq": 8, "batch": 1, "lr": 1e-3,
           "smoke": True}
    rec = bench._run_in_subprocess(cfg, str(tmp_path), timeout=30.0)
    assert rec["status"] == "timeout", rec
    assert "(last: step " in rec["error"] and rec["wall_s"] < 60, rec
    log = open(rec["log"]).read()
    assert "most recent call first" in log and "_run_variant" in log, log[-2000:]


@pytest.mark.slow
def test_a_timed_out_worker_leaves_its_stacks_even_if_the_signal_does_nothing(tmp_path, monkeypatch):
    """On the H100 (2026-12-07) a worker past its timeout left no stacks after SIGUSR1. The worker also dumps
    them itself at a deadline just before the kill (a watchdog thread), into a file appended to the log."""
    import signal
    import subprocess

    send = subprocess.Popen.send_signal  # SIGUSR1 is lost; the kill (Popen.kill sends through here) is not
    monkeypatch.setattr(subprocess.Popen, "send_signal",
                        lambda self, sig: None if sig == signal.SIGUSR1 else send(self, sig))
    cfg = {"model": "tiny-qwen2", "variant": "eager-amp", "steps": 20000, "seq": 8, "batch": 1, "lr": 1e-3,
           "smoke": True}
    rec = bench._run_in_subprocess(cfg, str(tmp_path), timeout=25.0)
    assert rec["status"] == "timeout", rec
    log = open(rec["log"]).read()
    assert "the worker's stacks (at 20 s" in log and "most recent call first" in log and "_run_variant" in log, \
        log[-2000:]


def test_the_stack_watchdog_does_not_kill_a_worker_busy_in_python(tmp_path):
    """In CI (2026-12-07) the worker of the test above segfaulted at its deadline dump: faulthandler's C
    watchdog reads frames without the GIL. Dumps 5 ms apart over a busy training loop for 3 s must leave the
    loop alive (faulthandler.dump_traceback_later with repeat=True kills this loop within a second or two)."""
    import subprocess
    import sys

    out = tmp_path / "stacks"
    code = (
        "import sys, time, torch\n"
        "from unsloth_fx.bench import stack_watchdog\n"
        f"f = open({str(out)!r}, 'w')\n"
        "stack_watchdog(f, 0.0, every=0.005)\n"
        "m = torch.nn.Linear(32, 32); opt = torch.optim.AdamW(m.parameters())\n"
        "t0 = time.time()\n"
        "while time.time() - t0 < 3.0:\n"
        "    m(torch.randn(4, 32)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "print('alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", (proc.returncode, proc.stderr[-2000:])
    dumps = out.read_text().count("most recent call first")
    assert dumps >= 20, dumps  # it did dump, many times, with the loop's frames in them
    assert "<string>" in out.read_text()


def test_the_timing_lock_dies_with_its_holder_even_if_a_forked_child_lives_on(tmp_path, monkeypatch):
    """A holder that forks (a compile worker) and is then killed must not leave the lock held by the child:
    with flock the child kept it, and every later timed section would wait forever."""
    import subprocess
    import sys
    import threading

    lock = str(tmp_path / "gpu.lock")
    monkeypatch.setenv("UFX_BENCH_LOCK", lock)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from unsloth_fx.bench import timed_section\n"
        "with timed_section():\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(15); os._exit(0)\n"  # the child outlives its parent, holding whatever it shares
        "    print('held', flush=True)\n"
        "    os.kill(os.getpid(), 9)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.wait(timeout=30)
    got = threading.Event()

    def take():
        with bench.timed_section():
            got.set()

    threading.Thread(target=take, daemon=True).start()
    assert got.wait(timeout=10), "the timing lock is still held after its holder was killed"


def test_worker_records_oom_and_crash_with_the_last_error_line(tmp_path, monkeypatch):
    cfg = {"model": "tiny-qwen2", "variant": "eager-amp", "steps": 1, "seq": 8, "batch": 1, "lr": 1e-3,
           "smoke": True, "result": str(tmp_path / "r.json")}
    json.dump(cfg, open(tmp_path / "c.json", "w"))

    def oom(_cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "run_variant", oom)
    assert bench._worker(str(tmp_path / "c.json")) == 0
    assert json.load(open(tmp_path / "r.json"))["status"] == "OOM"

    def crash(_cfg):
        raise RuntimeError("first line\nthe real reason")

    monkeypatch.setattr(bench, "run_variant", crash)
    bench._worker(str(tmp_path / "c.json"))
    rec = json.load(open(tmp_path / "r.json"))
    assert rec == {"status": "crash", "error": "RuntimeError: the real reason"}

    def backend_failed(_cfg):  # the layout of torch's BackendCompilerFailed message: the cause, then advice
        raise RuntimeError("backend='unsloth' raised:\nInfeasibleBudget: memory_budget=7.00 GiB ...\n\n"
                           "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially "
                           "if you're reporting a bug to PyTorch). For even more developer context, set "
                           "TORCH_LOGS=\"+dynamo\"\n")

    monkeypatch.setattr(bench, "run_variant", backend_failed)
    bench._worker(str(tmp_path / "c.json"))
    rec = json.load(open(tmp_path / "r.json"))
    assert rec["status"] == "crash" and "InfeasibleBudget: memory_budget=7.00 GiB" in rec["error"], rec


def test_an_amb_variant_in_process_sets_torchs_knob_for_its_compile_and_puts_it_back(monkeypatch):
    # in-process (as here), a leaked activation_memory_budget would reach every later compile of the process
    import torch._functorch.config as fc
    import torch._functorch.partitioners as partitioners

    seen, choose = [], partitioners.choose_saved_values_set

    def spy(joint_graph, node_info, memory_budget=1):
        seen.append(memory_budget)
        return choose(joint_graph, node_info, memory_budget=memory_budget)

    monkeypatch.setattr(partitioners, "choose_saved_values_set", spy)
    torch._dynamo.reset()  # a fresh compile, not a cached one
    cfg = {"model": "tiny-qwen2", "variant": "compile-bf16-amb0.3", "steps": 1, "seq": 8, "batch": 1, "lr": 1e-3,
           "smoke": True}
    with fc.patch(activation_memory_budget=0.9):  # the caller's own value, not torch's default
        rec = bench.run_variant(cfg)
        assert fc.activation_memory_budget == 0.9
    assert rec["status"] == "ok" and len(rec["losses"]) == 1, rec
    assert seen and set(seen) == {0.3}  # the lazy compile (step 0) ran under the variant's budget


def test_bad_variant_and_gpu_requirement(capsys):
    assert bench.main(["--variants", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--variants", "eager-amp"]) == 2
        assert "needs CUDA" in capsys.readouterr().err


def test_markdown_marks_failures():
    doc = {"meta": {"device": "H100", "torch": "2.11", "transformers": "5.17", "date": "d", "batch": 1, "seq": 2048,
                    "steps": 20, "lr": 1e-5, "smoke": False},
           "results": [{"model": "m", "variant": "eager-amp", "status": "OOM", "error": "CUDA out of memory"},
                       {"model": "m", "variant": "ufx-7GiB", "status": "ok", "peak_bytes": 7 * 2**30 - 2**29,
                        "tokens_per_s": 25000.0, "compile_s": 61.0, "loss": 6.5, "ufx": {"setup_s": 120.5}},
                       {"model": "m", "variant": "compile-amp", "status": "ok", "peak_bytes": 2**30,
                        "tokens_per_s": 30000.0, "compile_s": 50.0, "loss": 6.4, "ufx": None}]}
    md = bench.markdown(doc)
    assert "| m | eager-amp | OOM: CUDA out of memory |" in md
    assert "| m | ufx-7GiB | ok | 6.50 | 25,000 | 120.500 | 61.000 | 6.500 |" in md
    assert "| m | compile-amp | ok | 1.00 | 30,000 |  | 50.000 | 6.400 |" in md


def _one_step(variant, seq):
    """One smoke step of ``variant`` on tiny-qwen2, freshly compiled."""
    torch._dynamo.reset()
    return bench.run_variant({"model": "tiny-qwen2", "variant": variant, "steps": 1, "seq": seq, "batch": 1,
                              "lr": 1e-3, "smoke": True})


def test_ablation_variant_runs_its_pipeline_and_tiers_and_records_the_plan():
    rec = _one_step("ufx-7GiB-fp32sums", seq=64)
    assert rec["status"] == "ok", rec
    opts = rec["ufx"]["options"]
    assert "chunk_recompute{accumulate=false}" in opts["pipeline"]
    assert "fuse_linear_cross_entropy{chunks=8,grad_weight_accum=fp32}" in opts["pipeline"]
    assert rec["ufx"]["check"] is None  # the ablation skips the early check
    assert rec["ufx"]["optimizer_policy"]["chosen"] == "int4/int4"
    assert set(rec["ufx"]["plan"]) == {"predicted_peak_h", "recompute", "offload", "offloaded_bytes"}
    assert 0 < rec["ufx"]["setup_s"] < 60  # apply_optimizations' own time, outside the steps
    from unsloth_fx import backend

    st = backend.LAST["ctx"].stats
    assert st["pre_grad"]["fuse_linear_cross_entropy"]["fused"] == 1
    assert st["pre_grad"]["fuse_linear_cross_entropy"]["grad_weight_accum"] == "fp32"
    assert "accumulated" not in st["joint"]["chunk_recompute"]  # sums left at the end, as asked


def test_no_budget_variant_compiles_without_a_budget():
    rec = _one_step("ufx-nobudget-int4", seq=32)
    assert rec["status"] == "ok", rec
    assert rec["ufx"]["options"]["memory_budget"] is None
    assert "split_token_chunks" not in rec["ufx"]["options"]["pipeline"]


def test_a_chunk_count_variant_compiles_with_that_many_chunks():
    rec = _one_step("ufx-24GiB-16chunks", seq=64)
    assert rec["status"] == "ok", rec
    pipe = rec["ufx"]["options"]["pipeline"]
    assert "split_token_chunks{chunks=16}" in pipe and "fuse_linear_cross_entropy{chunks=16}" in pipe, pipe


def test_the_7b_variant_without_the_check_fixes_its_tier_and_chunks():
    rec = _one_step("ufx-24GiB-16chunks-int4", seq=64)
    assert rec["status"] == "ok", rec
    assert rec["ufx"]["check"] is None  # no early check ran
    assert rec["ufx"]["optimizer_policy"]["chosen"] == "int4/int4"
    pipe = rec["ufx"]["options"]["pipeline"]
    assert "split_token_chunks{chunks=16}" in pipe and "fuse_linear_cross_entropy{chunks=16}" in pipe, pipe
    # pinned rounds first; 0.2% under the budget for the model's residual error (docs/memory.md, fourteenth session)
    assert "plan_memory{optimizer=int4/int4,layer_checkpoints=first,margin=0.002}" in pipe, pipe
    assert rec["ufx"]["options"]["memory_budget"] == "64MiB"  # smoke: the tiny model's budget, still planned


@pytest.mark.parametrize("variant,margin", [("ufx-7GiB-int4-lmhead", 0.0), ("ufx-7GiB-int4-lmhead-m025", 0.025)])
def test_the_lm_head_only_variant_chunks_the_lm_head_and_not_the_mlps(variant, margin):
    rec = _one_step(variant, seq=64)
    assert rec["status"] == "ok", rec
    pipe = rec["ufx"]["options"]["pipeline"]
    assert "fuse_linear_cross_entropy{chunks=8}" in pipe and "split_token_chunks" not in pipe, pipe
    assert rec["ufx"]["check"] is None and rec["ufx"]["optimizer_policy"]["chosen"] == "int4/int4"
    from unsloth_fx import backend

    st = backend.LAST["ctx"].stats
    assert st["pre_grad"]["fuse_linear_cross_entropy"]["fused"] == 1
    assert "split_token_chunks" not in st["pre_grad"]
    smoke_budget = 64 * 2**20  # smoke runs give every budget variant 64 MiB
    assert st["joint"]["plan_memory"]["budget"] == int(smoke_budget * (1 - margin))


def test_ufx_arguments_are_what_the_suite_and_peak_snapshot_pass_to_apply_optimizations():
    budget, kw = bench.ufx_arguments(bench.VARIANTS["ufx-24GiB-16chunks-int4"][1])
    assert budget == "24GiB" and kw["check"] is False and kw["chunks"] == 16
    assert kw["optimizer_options"] == {"state_precision": "int4", "high_precision_tier": "int4"}
    assert "layer_checkpoints=first" in kw["pipeline"] and "lower" not in kw
    budget, kw = bench.ufx_arguments(bench.VARIANTS["ufx-7GiB"][1])
    assert (budget, kw) == ("7GiB", {"check": True})  # the product path: apply_optimizations' own choices
    budget, kw = bench.ufx_arguments(bench.VARIANTS["ufx-7GiB"][1], smoke=True)
    assert (budget, kw) == ("64MiB", {"lower": "eager", "check": True})
    assert bench.ufx_arguments(bench.VARIANTS["ufx-nobudget-int4"][1])[0] is None


def test_peak_snapshot_takes_a_suite_variant(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peak_snapshot.py"
    spec = importlib.util.spec_from_file_location("peak_snapshot", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    assert "--variant" in capsys.readouterr().out
    assert mod.main(["--smoke"]) == 0  # the replay logic (the GPU path needs CUDA)
    rec = json.loads(capsys.readouterr().out)
    assert rec["replayed_peak"] == 171_000 and rec["peak_event"] == 5 and rec["live"] == [1, 2, 3]
    assert rec["backward_starts_at"] == 2 and rec["peak_phase"].startswith("backward")
    assert [(r["size"], r["blocks"]) for r in rec["held_before_recording"]] == [(4096, 1), (512, 1)]
    assert mod._phase(1, 2) == "forward" and mod._phase(5, None) == "unknown"
