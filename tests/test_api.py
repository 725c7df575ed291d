"""unsloth_fx.api.apply_optimizations: optimizer + early budget check + unsloth compile."""

import pytest
import torch

import unsloth_fx.backend as B
from unsloth_fx.api import apply_optimizations, build_optimizer, check_budget, feature_status
from unsloth_fx.memory.schedule import InfeasibleBudget
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.zoo import build_model


def _tiny(**kw):
    torch.manual_seed(0)
    return build_model("tiny-qwen2", device="cpu", **kw)


def test_returns_a_compiled_model_planned_to_the_target_and_a_hybrid_optimizer():
    model = _tiny()
    compiled, opt = apply_optimizations(model, target_vram="64MiB", lr=3e-3, lower="eager", seq_len=64, batch_size=2,
                                       chunks=8, optimizer_options={"implementation": "reference"})  # no interpreter
    assert isinstance(opt, HybridAdamW)
    rep = compiled.ufx_report
    assert rep["options"]["memory_budget"] == "64MiB"
    assert "plan_memory{optimizer=hybrid,margin=0.025}" in rep["options"]["pipeline"]  # room for the 2.5% margin
    assert rep["check"]["feasible"] and rep["check"]["smallest_feasible"] <= 64 * 2**20
    x = torch.randint(0, 512, (2, 64))
    B.LAST.clear()
    losses = []
    for _ in range(4):
        loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    stats = B.LAST["ctx"].stats
    assert stats["joint"]["plan_memory"]["budget"] == int(64 * 2**20 * 0.975)  # planned 2.5% under the target
    assert stats["joint"]["plan_memory"]["feasible"]
    assert stats["pre_grad"]["fuse_linear_cross_entropy"]["fused"] == 1  # no [tokens, vocab] logits
    assert losses[-1] < losses[0] - 0.2, losses
    if rep["features"]["fuse_optimizer"] == "available":
        from unsloth_fx import fusion

        assert rep["options"]["fuse_optimizer"] is True
        assert all(p.grad is None for p in model.parameters())  # updated inside backward
        assert any(fusion.is_fused(p) for p in model.parameters())


def test_infeasible_target_fails_before_training_with_the_planners_breakdown():
    model = _tiny()
    before = {n: p.clone() for n, p in model.named_parameters()}
    fixed = {"state_precision": "hybrid"}  # a fixed tier: no policy search
    # parameters alone (550 KiB fp32) + optimizer state exceed 1 MiB: caught without tracing
    with pytest.raises(InfeasibleBudget, match=r"target_vram=1.00 MiB is infeasible before any activation: "
                                               r"parameters 550.50 KiB .*smallest feasible budget at least"):
        apply_optimizations(model, target_vram="1MiB", fuse_optimizer=False, lower="eager", optimizer_options=fixed)
    # static bytes fit the target; the traced activations at batch 2 x seq 64 do not
    # (apply_optimizations credits its chunking passes: check the same way)
    chk = check_budget(model, None, seq_len=64, batch_size=2, fuse_optimizer=False, chunks=8)
    target = (chk.static_peak + chk.smallest_feasible) // 2
    assert chk.static_peak < target < chk.smallest_feasible
    with pytest.raises(InfeasibleBudget, match=r"infeasible for batch 2 x seq 64: parameters .* \+ optimizer state "
                                               r".* \+ minimum activations and in-flight gradients .* = .*"
                                               r"smallest feasible budget") as e:
        apply_optimizations(model, target_vram=target, seq_len=64, batch_size=2, fuse_optimizer=False,
                            lower="eager", optimizer_options=fixed)
    assert e.value.smallest_feasible == chk.smallest_feasible
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing ran
    # the smallest feasible budget it names is accepted
    check_budget(model, e.value.smallest_feasible, seq_len=64, batch_size=2, fuse_optimizer=False, chunks=8)


def test_extrapolated_check_matches_a_full_trace_within_ten_percent():
    model = _tiny(num_hidden_layers=4)
    extrap = check_budget(model, None, seq_len=64, batch_size=1, fuse_optimizer=False)
    assert extrap.extrapolated and extrap.traced_layers == [1, 2]
    import unsloth_fx.api as api

    full_act = api._activation_floor(model, (4, 0), 1, 64, "hybrid", False)
    resident = extrap.parameters + extrap.optimizer_state
    full_pred = max(resident + full_act[0], extrap.static_peak)
    assert extrap.predicted_peak == pytest.approx(full_pred, rel=0.10)


def test_optimizer_choice_and_bad_inputs():
    model = _tiny()
    assert type(build_optimizer(model, "adamw", 1e-3)) is torch.optim.AdamW
    assert isinstance(build_optimizer(model, "hybrid_adam", 1e-3), HybridAdamW)
    with pytest.raises(ValueError, match="optimizer='lion'"):
        build_optimizer(model, "lion")
    from unsloth_fx.options import OptionError

    with pytest.raises(OptionError, match="lower"):
        apply_optimizations(model, target_vram="64MiB", lower="tvm", check=False)
    with pytest.raises(ValueError, match="fraction of device memory"):
        check_budget(model, 0.5)
    feats = feature_status()
    assert set(feats) == {"memory_planner", "chunked_lm_head_ce", "chunked_mlp", "fuse_optimizer", "hybrid_adam"}
    if feats["fuse_optimizer"] == "available":
        with pytest.raises(ValueError, match="needs optimizer='hybrid_adam'"):
            apply_optimizations(model, optimizer="adamw", fuse_optimizer=True, check=False)
    else:
        with pytest.raises(NotImplementedError, match="not available yet"):
            apply_optimizations(model, fuse_optimizer=True, check=False)


def test_example_train_r1_distill_cpu_mode(capsys):
    import runpy
    import sys

    ns = runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "examples" / "train_r1_distill.py"))
    argv = sys.argv
    try:
        rc = ns["main"](["--model", "tiny-qwen2", "--steps", "3", "--lr", "3e-3", "--target-vram", "64MiB"])
    finally:
        sys.argv = argv
    assert rc == 0
    out = capsys.readouterr().out
    assert "trained 3 steps: loss 6." in out


@pytest.mark.parametrize("budget,mlp,lm_head,margin", [("64MiB", False, False, True), ("25000KiB", False, True, True),
                                                       ("23500KiB", True, True, True), ("22600KiB", True, True, False)])
def test_chunks_auto_chunks_only_what_the_budget_needs(budget, mlp, lm_head, margin, capsys):
    # tiny-qwen2, batch 2 x seq 1024, fused int4/int4, without offload (CPU check, 2026-12-07): unchunked fits
    # from 25,632 KiB, the LM head + CE chunked alone from 24,608 KiB, the MLPs chunked too from 22,528 KiB.
    # plan_memory gets PLAN_MARGIN (2.5%): always with the MLPs unchunked, and with them chunked when the
    # smallest feasible budget is 2.5% under the budget (22,528 KiB: from 23,106 KiB)
    model = _tiny()
    compiled, _ = apply_optimizations(model, target_vram=budget, lr=3e-3, lower="eager", seq_len=1024, batch_size=2,
                                      optimizer_options={"implementation": "reference", "state_precision": "int4",
                                                         "high_precision_tier": "int4"})
    pipe = compiled.ufx_report["options"]["pipeline"]
    assert ("+split_token_chunks{chunks=8}" in pipe) is mlp, pipe
    assert ("+fuse_linear_cross_entropy{chunks=8}" in pipe) is lm_head, pipe
    assert ("plan_memory{optimizer=int4/int4,margin=0.025}" in pipe) is margin, pipe
    out = capsys.readouterr().out
    assert ("no 2.5% margin under the budget (smallest feasible 22.00 MiB of 22.07 MiB)" in out) is not margin, out
    if lm_head:
        assert ("the MLPs stay chunked" in out) is mlp and ("no MLP chunking" in out) is not mlp, out
        assumed = " ".join(compiled.ufx_report["check"]["assumptions"])
        assert ("the MLPs not chunked" in assumed) is not mlp, assumed
    x = torch.randint(0, 512, (2, 1024))
    out = compiled(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_chunks_must_be_auto_or_a_positive_int():
    with pytest.raises(ValueError, match="chunks=0"):
        apply_optimizations(_tiny(), target_vram="64MiB", chunks=0, lower="eager")


def test_check_traces_with_the_lowering_the_compile_uses(monkeypatch):
    """The early check plans the step under the compile's ``lower`` (default inductor, as the
    backend): its all-saved peak is the CLI planner's figure for the same model and lowering."""
    from unsloth_fx.memory import whole

    model = build_model("tiny-qwen2", device="cpu", dtype=torch.bfloat16)
    figs = {}
    for low in ("inductor", "eager"):
        chk = check_budget(model, None, optimizer="adamw-bf16", seq_len=256, batch_size=1, lower=low)
        est = whole.estimate("tiny-qwen2", seq=256, optimizer="adamw-bf16", lower=low)
        resident = est.static.resident
        figs[low] = chk.predicted_peak
        # the same trace and timeline as the CLI (its peak outside the optimizer step may sit lower)
        assert chk.predicted_peak - resident == pytest.approx(est.base_peak - resident, rel=0.02), low
    assert figs["inductor"] < figs["eager"]  # the fp32 CE chain Inductor fuses is not materialized
    # apply_optimizations passes the compile's lowering through (the option; default inductor)
    import unsloth_fx.api as api

    seen = []
    real = api._activation_floor
    monkeypatch.setattr(api, "_activation_floor", lambda *a, **k: seen.append(k["lower"]) or real(*a, **k))
    for opts, want in (({"lower": "eager"}, "eager"), ({}, "inductor")):
        seen.clear()
        apply_optimizations(_tiny(), target_vram="1GiB", seq_len=64, batch_size=1, chunks=8,
                            optimizer_options={"state_precision": "fp32", "high_precision_tier": "fp32"}, **opts)
        assert seen and set(seen) == {want}, (opts, seen)


def test_a_budget_the_extrapolation_refuses_is_decided_on_a_trace_of_all_layers(monkeypatch, capsys):
    """Unchunked tiny-qwen2 (6 layers, seq 256): the 1->2 layer extrapolation's floor is 7.22 MiB, a
    trace of all 6 layers plans it in 5.52 MiB. A 7 MiB budget is accepted after the full trace; a
    budget below half the extrapolated activations is refused without one."""
    import unsloth_fx.api as api

    model = _tiny(num_hidden_layers=6)
    kw = dict(seq_len=256, batch_size=1, fuse_optimizer=False)
    seen = []
    real = api._activation_floor
    monkeypatch.setattr(api, "_activation_floor", lambda m, counts, *a, **k: seen.append(counts) or real(m, counts, *a, **k))
    extrap = check_budget(model, None, **kw)
    assert extrap.extrapolated and extrap.smallest_feasible == 8 * 2**20 and seen == [(1, 0), (2, 0)]
    seen.clear()
    chk = check_budget(model, 7 * 2**20, **kw)
    assert seen == [(1, 0), (2, 0), (6, 0)] and chk.traced_layers == [6] and not chk.extrapolated
    assert chk.smallest_feasible <= 7 * 2**20 and chk.feasible
    assert "replaced by a trace of all 6 layers" in chk.notes[-1]
    assert "tracing all 6 layers to decide" in capsys.readouterr().out
    # the accepted budget is what the whole graph needs: a full trace's own floor, not the extrapolation's
    assert chk.predicted_peak == pytest.approx(max(chk.parameters + chk.optimizer_state + real(
        model, (6, 0), 1, 256, "hybrid", False)[0], chk.static_peak), rel=1e-6)
    seen.clear()
    resident = chk.parameters + chk.optimizer_state
    with pytest.raises(InfeasibleBudget, match=r"extrapolated from \[1, 2\] traced layers"):
        check_budget(model, max(resident + 2**20, chk.static_peak), **kw)
    assert seen == [(1, 0), (2, 0)]  # refused on the extrapolation: no full trace


def test_a_pipeline_given_with_the_fused_lm_head_patches_the_model_so_the_pass_fuses():
    # the documented way to keep an fp32 LM-head gradient: before, the logits stayed a graph output and
    # the pass skipped the LM head ("logits ... have other users"), the step ran unfused
    model = _tiny()
    pipe = "default,plan_memory{optimizer={OPTIMIZER}},+fuse_linear_cross_entropy{chunks=4,grad_weight_accum=fp32}"
    compiled, _ = apply_optimizations(model, target_vram=None, lr=3e-3, lower="eager", check=False, pipeline=pipe,
                                      optimizer_options={"implementation": "reference"})
    x = torch.randint(0, 512, (2, 64))
    compiled(input_ids=x, labels=x).loss.backward()
    st = B.LAST["ctx"].stats["pre_grad"]["fuse_linear_cross_entropy"]
    assert st["fused"] == 1 and st["skipped"] == [], st
    assert st["grad_weight_accum"] == "fp32"


def test_apply_optimizations_traces_each_step_shape_once_across_its_checks(monkeypatch):
    """chunks="auto" first checks the unchunked step, then the tier ladder and the built optimizer check the
    step the compile will run: when that is the unchunked one, its traces are reused (on the 1.5B model a
    trace of all layers is about 47 s on a GPU host and minutes on a CPU)."""
    import unsloth_fx.memory.whole as W

    calls = []
    real = W.trace_step
    monkeypatch.setattr(W, "trace_step", lambda m, *a, **k: calls.append((len(m.model.layers), k.get("chunks")))
                        or real(m, *a, **k))
    model = _tiny(num_hidden_layers=6)
    apply_optimizations(model, target_vram="7MiB", seq_len=256, batch_size=1, lower="eager", fuse_optimizer=False,
                        optimizer_options={"implementation": "reference"})
    assert calls == [(1, None), (2, None)]


def test_a_second_check_on_the_same_trace_cache_says_it_reuses_the_full_trace(monkeypatch, capsys):
    import unsloth_fx.memory.whole as W

    calls = []
    real = W.trace_step
    monkeypatch.setattr(W, "trace_step", lambda m, *a, **k: calls.append(len(m.model.layers)) or real(m, *a, **k))
    model, kw, cache = _tiny(num_hidden_layers=6), dict(seq_len=256, batch_size=1, fuse_optimizer=False), {}
    check_budget(model, 7 * 2**20, _cache=cache, **kw)
    assert calls == [1, 2, 6] and "tracing all 6 layers to decide" in capsys.readouterr().out
    chk = check_budget(model, 7 * 2**20, _cache=cache, **kw)
    out = capsys.readouterr().out
    assert calls == [1, 2, 6] and "deciding on the trace of all 6 layers made earlier" in out and "tracing" not in out
    assert chk.feasible and chk.traced_layers == [6]
    assert "replaced by a trace of all 6 layers (made earlier)" in chk.notes[-1], chk.notes
