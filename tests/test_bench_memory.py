"""benchmarks/bench_memory.py (issue 3's GPU table): the pairing of our cells with the nearest-memory
torch cell, the grid and its time estimate, a refused cell recorded with the planner's message, and
(slow) the CPU smoke run of every mode in subprocesses."""

import json
import pathlib

import pytest

from _support import load_script

GiB = 2**30
PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


@pytest.fixture(scope="module")
def bm():
    return load_script(PATH, "_ufx_bench_memory")


def _torch(seq, peak, tps, mode="torch-budget", amb=0.1):
    return {"mode": mode, "seq": seq, "budget": None, "amb": amb, "measured_peak": peak - 1,
            "measured_peak_all": peak, "tokens_per_s": tps}


def _ours(seq, budget, peak, tps, **kw):
    return {"mode": "ours-apply", "seq": seq, "budget": budget * GiB, "measured_peak": peak - 1,
            "measured_peak_all": peak, "tokens_per_s": tps, "tier": "hybrid", "chunks": 0, **kw}


def test_each_ours_cell_pairs_with_the_nearest_memory_torch_cell_of_its_seq(bm):
    stock_1k = _torch(1024, int(13.4 * GiB), 20000.0, mode="stock", amb=None)
    amb_1k = _torch(1024, int(13.3 * GiB), 18000.0)
    stock_4k = _torch(4096, int(18.6 * GiB), 30000.0, mode="stock", amb=None)
    amb_4k_lo = _torch(4096, 13600 * 2**20, 25000.0, amb=0.1)
    amb_4k_mid = _torch(4096, 14800 * 2**20, 27000.0, amb=0.3)
    o_1k = _ours(1024, 12, int(11.0 * GiB), 15000.0)
    o_4k_8 = _ours(4096, 8, 7900 * 2**20, 20000.0)
    o_4k_16 = _ours(4096, 16, 14200 * 2**20, 24000.0)  # 600 MiB from amb 0.1 and from amb 0.3: a tie
    refused = {"mode": "ours-apply", "seq": 4096, "budget": 12 * GiB, "tier": "hybrid/int4", "chunks": 8,
               "refused": "memory_budget=12.00 GiB is infeasible for this graph: ...", "refused_at": "compile"}
    off = _ours(4096, 12, int(11.5 * GiB), 21000.0, tag="offload")
    results = [stock_1k, amb_1k, o_1k, stock_4k, amb_4k_lo, amb_4k_mid, o_4k_8, o_4k_16, refused, off]
    rows = bm.pair_with_torch(results)
    assert [r["ours"] for r in rows] == [o_1k, o_4k_8, o_4k_16, refused]  # the offload pair is not paired
    assert rows[0]["torch"] is amb_1k  # 13.3 is nearer 11.0 than stock's 13.4: never a cell of another seq
    assert rows[1]["torch"] is amb_4k_lo
    assert rows[1]["gap"] == amb_4k_lo["measured_peak_all"] - o_4k_8["measured_peak_all"]
    assert rows[1]["speedup"] == pytest.approx(20000.0 / 25000.0)
    assert rows[2]["torch"] is amb_4k_lo  # tie on distance: the lower-memory torch cell
    assert rows[3]["torch"] is None and rows[3]["gap"] is None
    md = bm.tables(results)
    assert "| 4096 | 8.00 | 7.71 | 20,000 | torch amb=0.1 | 13.28 | +5.57 | 25,000 | 0.80x |" in md
    assert "| 4096 | 12.00 | refused | | | | | | |" in md
    assert "refused at compile: memory_budget=12.00 GiB is infeasible" in md
    assert "| offload | 4096 | 12.00 |" in md


def test_pairing_uses_the_all_steps_peak(bm):
    # the first step may peak higher than the timed ones (HybridAdamW's first step allocates its pool)
    t_lo, t_hi = _torch(2048, int(12.0 * GiB), 1.0), _torch(2048, int(13.0 * GiB), 1.0, amb=0.3)
    o = _ours(2048, 16, int(12.9 * GiB), 1.0)
    o["measured_peak"] = int(12.1 * GiB)
    assert bm.pair_with_torch([t_lo, t_hi, o])[0]["torch"] is t_hi


def test_default_grid_and_its_estimate(bm):
    cells = bm.build_cells(model="m", device="cuda", lower="inductor", seqs=[1024, 2048, 4096], budgets=[8, 12, 16],
                           modes=["stock", "torch-budget", "ours-apply"], ambs=[0.1, 0.3], steps=3,
                           torch_adamw="fused", offload_cell=None)
    assert len(cells) == 18
    assert [c["mode"] for c in cells[:6]] == ["stock", "torch-budget", "torch-budget", "ours-apply", "ours-apply",
                                             "ours-apply"]
    assert [c.get("amb") for c in cells[1:3]] == [0.1, 0.3]
    cost = {"start": 0.0, "check": 10.0, "compile_torch": 10.0, "compile_ours": 20.0, "step": 1.0}
    # 9 ours cells of 31 s and 9 torch cells of 11 s on 6 lanes (longest first), then 18 x 4 timed steps (serial)
    # lanes after the ours cells: 62 62 62 31 31 31; the torch cells fill the last three to 64
    assert bm.estimate_seconds(cells, 6, cost) == pytest.approx(64 + 18 * 4)
    assert bm.estimate_seconds(cells, 1, cost) == pytest.approx(9 * 31 + 9 * 11 + 18 * 4)
    est = bm.estimate_seconds(cells, 6)
    assert est < 8 * 60, est  # the default grid fits the 8-minute target with the script's own costs
    off = bm.build_cells(model="m", device="cuda", lower="inductor", seqs=[1024], budgets=[8], modes=["ours-apply"],
                         ambs=[], steps=3, torch_adamw="fused",
                         offload_cell={"seq": 4096, "budget": 12 * GiB, "chunks": 0, "plan": {"h2d_gbps": 25.0}})
    assert [(c.get("tag"), c.get("plan")) for c in off[1:]] == [
        ("offload", {"h2d_gbps": 25.0, "offload": True}), ("no-offload", {"h2d_gbps": 25.0, "offload": False})]


def test_product_pipeline_sets_plan_memory_options_and_chunk_passes(bm):
    from unsloth_fx.pipeline import Pipeline

    pipe = bm._product_pipeline({"offload": False, "h2d_gbps": 5.0}, 8)
    assert pipe == ("default,plan_memory{optimizer={OPTIMIZER},offload=false,h2d_gbps=5.0},"
                    "+split_token_chunks{chunks=8},+fuse_linear_cross_entropy{chunks=8}")
    opts = {s.name: o for s, o in Pipeline.parse(pipe.replace("{OPTIMIZER}", "int8/int8")).passes()}
    assert opts["plan_memory"] == {"optimizer": "int8/int8", "offload": False, "h2d_gbps": 5.0}
    assert bm._chunks_of(pipe) == 8 and bm._chunks_of(bm._product_pipeline({}, 0)) == 0


def test_a_refused_cell_is_recorded_with_the_planners_message(bm):
    # tiny-qwen2's parameters alone exceed 64 KiB: apply_optimizations refuses before compiling
    r = bm.run_cell("tiny-qwen2", 32, 2**16, "ours-apply", "cpu", "eager", 1)
    assert r["refused_at"] == "check", r
    assert r["refused"].startswith("target_vram=64.00 KiB is infeasible before any activation: parameters ")
    assert "smallest feasible budget" in r["refused"]
    assert "No HybridAdamW state policy fits" in r["refused"]  # every tier of the ladder was tried
    assert "tokens_per_s" not in r and "measured_peak" not in r
    md = bm.tables([r])
    assert "| ours-apply | 32 | 0.00 | - | - | - | - | - | - | - | refused at check: target_vram=64.00 KiB" in md


def test_a_torch_budget_cell_sets_torchs_knob_for_its_compile_and_puts_it_back(bm, monkeypatch):
    # in-process (as here), a leaked activation_memory_budget would reach every later compile of the process
    import torch
    import torch._functorch.config as fc
    import torch._functorch.partitioners as partitioners

    seen, choose = [], partitioners.choose_saved_values_set

    def spy(joint_graph, node_info, memory_budget=1):
        seen.append(memory_budget)
        return choose(joint_graph, node_info, memory_budget=memory_budget)

    monkeypatch.setattr(partitioners, "choose_saved_values_set", spy)
    torch._dynamo.reset()  # a fresh compile, not a cached one
    with fc.patch(activation_memory_budget=0.9):  # the caller's own value, not torch's default
        r = bm.run_cell("tiny-qwen2", 16, None, "torch-budget", "cpu", "eager", 1, amb=0.3)
        assert fc.activation_memory_budget == 0.9
    assert "error" not in r and r["tokens_per_s"] > 0, r
    assert seen and set(seen) == {0.3}  # the lazy compile (first step) ran under the cell's budget


def test_refusal_is_found_through_dynamos_wrapping(bm):
    from unsloth_fx.memory.schedule import InfeasibleBudget

    inner = InfeasibleBudget("memory_budget=1.00 GiB is infeasible for this graph: ...", smallest_feasible=2,
                             breakdown={})
    try:
        try:
            raise inner
        except InfeasibleBudget as e:
            raise RuntimeError("backend='unsloth' raised:\nInfeasibleBudget: ...") from e
    except RuntimeError as outer:
        assert bm._refusal(outer) == str(inner)
    assert bm._refusal(RuntimeError("CUDA error: an illegal memory access")) is None


@pytest.mark.slow
def test_smoke_runs_every_mode_on_cpu(bm, tmp_path):
    out = tmp_path / "bm.json"
    assert bm.main(["--smoke", "--offload-cell", "--jobs", "2", "--out", str(out)]) == 0
    res = json.load(open(out))["results"]
    by = {(r["mode"], r.get("tag") or "", r.get("budget"), r.get("amb")): r for r in res}
    assert len(by) == len(res) == 7, [(r["mode"], r.get("tag"), r.get("error")) for r in res]
    for r in res:
        assert "error" not in r, r
    ok = by[("ours-apply", "", 64 * 2**20, None)]
    assert ok["tier"] == "hybrid" and ok["fuse_optimizer"] is True and ok["tokens_per_s"] > 0
    assert ok["predicted_peak"] > 0 and ok["check_smallest_feasible"] > 0
    assert by[("ours-apply", "", 2**16, None)]["refused_at"] == "check"
    assert by[("torch-budget", "", None, 0.3)]["tokens_per_s"] > 0
    on, off = by[("ours-apply", "offload", 64 * 2**20, None)], by[("ours-apply", "no-offload", 64 * 2**20, None)]
    assert on["plan_options"] == {"force_offload": "all", "offload": True} and on["offload"] > 0
    assert on["offloaded_bytes"] > 0 and on["tokens_per_s"] > 0
    assert off["offload"] == 0 and off["offloaded_bytes"] == 0
