"""`unsloth-fx` CLI: plan (output, files, errors, exit codes), inspect, bench placeholder."""

import json
import os
import subprocess
import sys

import pytest
import torch

from unsloth_fx.cli import main


def test_plan_prints_the_breakdown_and_writes_the_schedule_files(tmp_path, capsys):
    rc = main(["plan", "--model", "tiny-qwen2", "--seq", "128", "--budget", "1GiB", "--no-seq-search",
               "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("parameters", "gradients", "optimizer state", "activation peak", "predicted peak",
                 "budget 1.00 GiB: fits without changes"):
        assert line in out, out
    doc = json.loads((tmp_path / "memory_schedule.json").read_text())
    assert doc["schema"] == "unsloth_fx.memory_schedule/1" and doc["events"]
    assert "<svg" in (tmp_path / "memory_schedule.html").read_text()
    assert (tmp_path / "memory_schedule.png").read_bytes().startswith(b"\x89PNG")


def test_plan_json_and_infeasible_budget_exit_code(capsys):
    rc = main(["plan", "--model", "tiny-qwen2", "--seq", "64", "--budget", "1MiB", "--json", "--quiet",
               "--no-seq-search", "--lower", "eager"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 3 and doc["feasible"] is False
    assert doc["smallest_feasible_budget"] > 2**20
    st = doc["static"]
    assert st["total"] == st["parameters"] + st["gradients"] + st["optimizer_state"] + st["workspace"]
    rc = main(["plan", "--model", "tiny-qwen2", "--seq", "64", "--budget", "1MiB", "--quiet", "--no-seq-search"])
    cap = capsys.readouterr()
    assert rc == 3 and "INFEASIBLE" in cap.out and "smallest feasible budget" in cap.err


def test_plan_reserves_the_cuda_workspaces_as_plan_memory_does(capsys):
    from unsloth_fx.passes.plan_memory import CUDA_WORKSPACE_RESERVE

    docs = {}
    for device in ("cuda", "cpu"):
        assert main(["plan", "--model", "tiny-qwen2", "--seq", "64", "--json", "--quiet", "--no-seq-search",
                     "--device", device]) == 0
        docs[device] = json.loads(capsys.readouterr().out)
    gpu, cpu = docs["cuda"], docs["cpu"]
    assert gpu["static"]["workspace"] == CUDA_WORKSPACE_RESERVE and cpu["static"]["workspace"] == 0
    for key in ("predicted_peak", "smallest_feasible_budget"):
        assert gpu[key] - cpu[key] == CUDA_WORKSPACE_RESERVE, key
    assert gpu["peak_floor"]["CUDA library workspaces"] == CUDA_WORKSPACE_RESERVE
    assert "CUDA library workspaces" not in cpu["peak_floor"]
    for doc in (gpu, cpu):
        floor = doc["peak_floor"]
        assert sum(v for k, v in floor.items() if k != "total") == floor["total"]


def test_plan_rejects_bad_arguments(capsys):
    assert main(["plan", "--model", "tiny-qwen2", "--seq", "64", "--budget", "7XB"]) == 2
    assert "unknown unit" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny-qwen2", "--seq", "64", "--budget", "0.5"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model", "--seq", "64"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_finds_the_largest_sequence_that_fits(capsys):
    rc = main(["plan", "--model", "tiny-llama", "--seq", "256", "--budget", "24MiB", "--json", "--quiet",
               "--lower", "eager", "--device", "cpu"])  # the search's bounds were set for the eager timeline
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    s = doc["largest_seq_that_fits"]
    assert s is not None and s >= 256 and s % 256 == 0
    # one granule longer does not fit
    rc = main(["plan", "--model", "tiny-llama", "--seq", str(s + 256), "--budget", "24MiB", "--json", "--quiet",
               "--no-seq-search", "--lower", "eager", "--device", "cpu"])  # the same timeline model as the search
    assert json.loads(capsys.readouterr().out)["smallest_feasible_budget"] > 24 * 2**20


def test_deepseek_r1_says_what_one_80gb_gpu_cannot_hold():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "unsloth_fx.cli", "plan", "--model", "deepseek-r1", "--seq", "1024",
                          "--budget", "80GB", "--no-seq-search"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "one 80 GB GPU cannot hold this step" in out.stdout
    assert "the parameters alone are 1249.88 GiB" in out.stdout  # 671B bf16 parameters
    assert "traced 1 dense + 1 MoE layer(s)" in out.stderr  # progress, extrapolated from traced layers


def test_inspect_summarizes_a_dump(tmp_path, capsys):
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    f = torch.compile(m, backend="unsloth", options={"lower": "eager", "dump": str(tmp_path)})
    f(torch.randn(4, 8)).sum().backward()
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "joint:plan_memory" in out and "memory:" in out
    assert "<table" in (tmp_path / "report.html").read_text()
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_bench_subcommand_routes_to_the_suite_and_its_own_flags(capsys):
    import pytest as _pytest

    from unsloth_fx.cli import main as cli_main

    with _pytest.raises(SystemExit) as e:
        cli_main(["bench", "--help"])
    assert e.value.code == 0
    assert "usage: unsloth-fx bench" in capsys.readouterr().out


def test_package_exports_the_seed_api_lazily():
    import unsloth_fx

    assert unsloth_fx.apply_optimizations.__module__ == "unsloth_fx.api"
    assert unsloth_fx.Trainer.__module__ == "unsloth_fx.trainer"
    import pytest as _pytest

    with _pytest.raises(AttributeError, match="no attribute 'nope'"):
        unsloth_fx.nope  # noqa: B018


def test_plan_names_host_transfers_in_the_overhead_when_it_offloads(capsys):
    # at its floor tiny-qwen2 (seq 512) fits only by offloading; the overhead line then counts the exposed
    # host transfers too, not recompute alone
    assert main(["plan", "--model", "tiny-qwen2", "--seq", "512", "--budget", "1GiB", "--json", "--quiet",
                 "--no-seq-search"]) == 0
    floor = json.loads(capsys.readouterr().out)["peak_floor"]["total"]
    assert main(["plan", "--model", "tiny-qwen2", "--seq", "512", "--budget", str(floor), "--no-seq-search"]) == 0
    out = capsys.readouterr().out
    decisions = next(ln for ln in out.splitlines() if "fits; decisions" in ln)
    assert "offload" in decisions, out
    assert "ms per step (recompute and exposed host transfers)" in out, out


def test_plan_chunks_the_lm_head_alone_with_no_chunk_mlp(capsys):
    """--no-chunk-mlp traces what apply_optimizations compiles when the step fits without MLP chunking: the LM
    head + CE chunked, the MLPs not; its floor lies between the unchunked one and the one with both chunked
    (tiny-qwen2, batch 2 x seq 1024, fused int4/int4)."""
    base = ["plan", "--model", "tiny-qwen2", "--seq", "1024", "--batch", "2", "--optimizer", "int4",
            "--high-precision-tier", "int4", "--fuse-optimizer", "--json", "--quiet", "--no-seq-search",
            "--device", "cpu", "--lower", "eager"]
    docs = {}
    for name, extra in (("none", ["--no-chunking"]), ("lm", ["--no-chunk-mlp"]), ("both", [])):
        assert main(base + extra) == 0
        docs[name] = json.loads(capsys.readouterr().out)
    assert docs["lm"]["chunk_mlp"] is False and docs["both"]["chunk_mlp"] is True
    assert docs["lm"]["chunking_credited"] == {"mlp": 0, "lm_head_ce": 8}, docs["lm"]["chunking_credited"]
    assert docs["both"]["chunking_credited"] == {"mlp": 8, "lm_head_ce": 8}
    floor = {k: d["smallest_feasible_budget"] for k, d in docs.items()}
    assert floor["both"] < floor["lm"] < floor["none"], floor


def test_plan_reports_the_flops_its_recomputes_add(capsys):
    """A budget between the smallest feasible and the unplanned peak makes the plan recompute matmuls: the JSON
    carries the step's and the recompute's FLOPs (the step's are the joint graph's, the same at any budget), and the
    text prints the tokens/s bound they imply. Without a plan there are no FLOP figures."""
    base = ["plan", "--model", "tiny-qwen2", "--seq", "512", "--quiet", "--no-seq-search", "--device", "cpu",
            "--no-chunking", "--optimizer", "int4", "--fuse-optimizer", "--lower", "eager"]
    assert main(base + ["--json"]) == 0
    free = json.loads(capsys.readouterr().out)
    assert free["step_flops"] is None and free["recompute_flops"] is None
    mid = (free["predicted_peak"] + free["smallest_feasible_budget"]) // 2
    assert main(base + ["--json", "--budget", str(mid)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decisions"].get("recompute"), doc["decisions"]
    sf, rf = doc["step_flops"], doc["recompute_flops"]
    assert 0 < rf < sf, (rf, sf)
    assert main(base + ["--json", "--budget", str(free["smallest_feasible_budget"])]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert tight["step_flops"] == sf and tight["recompute_flops"] >= rf
    assert main(base + ["--budget", str(mid)]) == 0
    out = capsys.readouterr().out
    assert f"({rf / sf:.1%}): at an equal FLOP rate, at most {sf / (sf + rf):.3f}x" in out, out
