"""benchmarks/bench_chunk.py: the recompute floor arithmetic, the largest-fit search (probe counts, on a
fake probe), and (slow) the CPU smoke run covering every variant on tiny-qwen2 and tiny-deepseek-v3."""

import json
import os
import subprocess
import sys

import pytest

from _support import load_script

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_chunk.py")


@pytest.fixture(scope="module")
def bc():
    return load_script(BENCH, "bench_chunk")


def test_flop_floor_by_hand_for_tiny_qwen2(bc):
    # Per layer: q 64x64 + k, v 32x64 + o 64x64 + gate, up 128x64 + down 64x128 = 36864; 2 layers + LM head 512x64
    # = 106496 matmul parameters. Attention: 2 layers x 16^2 x 4 heads x (16 + 16) = 65536. Step = 3 x (2 x 16
    # tokens x 106496 + 65536). Recomputed: gate + up, 2 x 8192 per layer -> 2 x 16 x 32768.
    f = bc.flop_floor("tiny-qwen2", 1, 16, "chunked")
    assert f["step_flops"] == 3 * (2 * 16 * 106496 + 65536) == 10420224
    assert f["recompute_flops"] == 2 * 16 * 32768
    assert f["ratio"] == pytest.approx(1048576 / 10420224)
    for v in ("unchunked", "lm_head", "lm_head_rows", "liger"):
        assert bc.flop_floor("tiny-qwen2", 1, 16, v)["recompute_flops"] == 0


def test_flop_floor_counts_moe_blocks(bc):
    # Layer 0 dense MLP gate + up (2 x 128x64) + the MoE block: router 8x64, routed gate_up (8x64x64) and down
    # (8x64x32) at top_k / experts = 2/8, shared expert gate + up (2 x 32x64).
    rec = 2 * 128 * 64 + 8 * 64 + (8 * 64 * 64 + 8 * 64 * 32) * 2 / 8 + 2 * 32 * 64
    assert bc.flop_floor("tiny-deepseek-v3", 2, 8, "chunked")["recompute_flops"] == 2 * 16 * rec


class _Probe:
    def __init__(self, fits_up_to):
        self.fits_up_to, self.seqs = fits_up_to, []

    def __call__(self, a, variant, seq, limit, model=None, steps=None, warmup=None):
        assert (steps, warmup) == (1, 1)  # a probe is one compile + one step
        self.seqs.append(seq)
        return {"seq": seq} if seq <= self.fits_up_to else {"seq": seq, "error": "CUDA out of memory", "oom": True}


def _args(bc):
    import argparse

    return argparse.Namespace(fit_step=1024, fit_max=131072)


def test_fit_search_from_the_measured_line_takes_two_probes(bc, monkeypatch):
    a = _args(bc)
    probe = _Probe(37000)
    monkeypatch.setattr(bc, "run_child", probe)
    # Peaks 4 GiB at 2048 and 7 GiB at 8192: 0.5 MiB/token -> 16 GiB at 26624 tokens.
    rows = [{"variant": "chunked", "model": "m", "seq": 2048, "peak_bytes": 4 << 30},
            {"variant": "chunked", "model": "m", "seq": 8192, "peak_bytes": 7 << 30},
            {"variant": "chunked", "model": "m", "seq": 16384, "error": "x"}]
    start = bc._line_fit(a, rows, "chunked", "m", 16 << 30)
    assert start == 26624
    assert bc.largest_fit(a, "chunked", 16 << 30, start) == (36864, 12)  # stepped up 10 times: a bad prediction
    probe.seqs.clear()
    assert bc.largest_fit(a, "chunked", 16 << 30, 36864) == (36864, 2)
    assert probe.seqs == [36864, 37888]
    probe.seqs.clear()
    assert bc.largest_fit(a, "chunked", 16 << 30, 38912) == (36864, 3)  # predicted too high: steps down
    assert probe.seqs == [38912, 37888, 36864]


def test_fit_search_without_a_prediction_doubles_then_bisects(bc, monkeypatch):
    monkeypatch.setattr(bc, "run_child", _Probe(37000))
    # 1k..32k fit (6), 64k fails (7), bisection 32k..64k at 1k granularity (5 more).
    assert bc.largest_fit(_args(bc), "chunked", 16 << 30, None) == (36864, 12)
    assert bc._line_fit(_args(bc), [{"variant": "chunked", "model": "m", "seq": 2048, "peak_bytes": 1}],
                        "chunked", "m", 16 << 30) is None


@pytest.mark.slow
def test_smoke_runs_every_variant_on_dense_and_moe_models(tmp_path):
    out = tmp_path / "bench_chunk.json"
    p = subprocess.run([sys.executable, BENCH, "--smoke", "--jobs", "2", "--out", str(out)], capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["model"], r["variant"], r["seq"]) for r in rows if "error" not in r}
    want = {(m, v, s) for m in ("tiny-qwen2", "tiny-deepseek-v3") for v in ("unchunked", "lm_head", "lm_head_rows", "chunked")
            for s in (64,)}
    assert want <= got, [r for r in rows if "error" in r]
    floors = {(r["model"], r["variant"]): r["flops"]["ratio"] for r in rows if r["seq"] == 64}
    assert floors[("tiny-qwen2", "lm_head")] == 0 and floors[("tiny-deepseek-v3", "chunked")] > 0
    assert "| lm_head | 64 |" in p.stdout and "recompute floor" in p.stdout


def test_a_failed_cell_records_the_exception_line_not_the_trailing_hint(bc):
    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
          "torch._dynamo.exc.BackendCompilerFailed: backend='unsloth' raised:\nRuntimeError: aliasing\n\n"
          "See https://pytorch.org/docs/stable/library.html#torch.library.opcheck\n")
    assert bc.error_line(tb) == "RuntimeError: aliasing"
    assert bc.error_line("no traceback here\nlast line") == "last line"
    assert bc.error_line("") == "no output"
