"""``unsloth-fx plan``: optimizer tier policy, fused optimizer and chunking options, and a
smallest-peak breakdown whose terms add up."""

import json

import pytest

from unsloth_fx.cli import main

BASE = ["plan", "--model", "tiny-qwen2", "--seq", "64", "--no-seq-search", "--quiet"]


def _plan(capsys, *extra):
    rc = main([*BASE, "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_tier_policy_fused_and_chunked(capsys):
    rc, doc = _plan(capsys, "--optimizer", "int4", "--high-precision-tier", "int4", "--fuse-optimizer")
    assert rc == 0
    assert doc["optimizer"] == "int4/int4" and doc["fuse_optimizer"] and doc["chunks"] == 8
    assert doc["chunking_credited"] == {"mlp": 8, "lm_head_ce": 8}
    st = doc["static"]
    assert st["gradients"] == 0 and set(st["optimizer_state_by_tier"]) == {"int4", "fp32"}
    assert sum(st["optimizer_state_by_tier"].values()) == st["optimizer_state"]
    floor = doc["peak_floor"]
    assert sum(v for k, v in floor.items() if k != "total") == floor["total"] == doc["smallest_feasible_budget"]
    assert any("embeddings / LM head int4" in a for a in doc["assumptions"])
    assert any("fused into backward" in a for a in doc["assumptions"])
    # the default tier keeps fp32 embeddings: more state than int4 everywhere
    rc, plain = _plan(capsys, "--optimizer", "int4", "--no-chunking")
    assert rc == 0 and plain["chunking_credited"] == {} and plain["chunks"] is None
    assert plain["static"]["optimizer_state"] > st["optimizer_state"]
    assert plain["static"]["gradients"] > 0
    assert any("no chunking" in a for a in plain["assumptions"])


def test_text_output_says_what_it_assumes(capsys):
    assert main([*BASE, "--optimizer", "hybrid", "--fuse-optimizer", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "assumes: optimizer state: HybridAdamW hybrid" in out
    assert "chunking credited" in out and "smallest peak     parameters" in out
    assert "(fused: each freed by its update in backward)" in out


@pytest.mark.parametrize("args,msg", [
    (["--optimizer", "adamw", "--high-precision-tier", "int4"], "HybridAdamW setting"),
    (["--optimizer", "adamw", "--fuse-optimizer"], "needs a HybridAdamW tier"),
    (["--chunks", "0"], "--chunks must be >= 1"),
])
def test_bad_combinations_exit_2(capsys, args, msg):
    assert main([*BASE, *args]) == 2
    assert msg in capsys.readouterr().err
