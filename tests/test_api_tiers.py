"""apply_optimizations / check_budget: the optimizer's state counted exactly (instances by
their own layout), the tier-policy ladder when the caller did not fix the tiers, and the
chunking the activation floor credits."""

import pytest
import torch

import unsloth_fx.api as api
from unsloth_fx.api import TIER_LADDER, apply_optimizations, check_budget
from unsloth_fx.memory import model as M
from unsloth_fx.memory.schedule import InfeasibleBudget
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.zoo import build_model


def _tiny(**kw):
    torch.manual_seed(0)
    return build_model("tiny-qwen2", device="cpu", **kw)


def _held(opt):
    return sum(M.round_block(t.numel() * t.element_size()) for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def test_check_counts_an_optimizer_instance_by_its_own_layout():
    model = _tiny()
    opt = HybridAdamW(model.named_parameters(), high_precision_tier="int4", implementation="reference")
    before = check_budget(model, None, optimizer=opt, fuse_optimizer=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    assert before.optimizer_state == _held(opt)  # what the first step allocated, counted before it
    assert check_budget(model, None, optimizer=opt, fuse_optimizer=False).optimizer_state == _held(opt)
    default = check_budget(model, None, optimizer="hybrid_adam", fuse_optimizer=False)
    assert default.optimizer_state > before.optimizer_state  # fp32 embeddings / LM head
    assert check_budget(model, None, optimizer="hybrid/int4", fuse_optimizer=False).optimizer_state == _held(opt)
    assert before.state_by_tier["int4"] > 0 and before.optimizer == "HybridAdamW"
    # settings a spec string does not carry (the hybrid pool's cap) are counted from the instance
    capped = HybridAdamW(model.named_parameters(), hybrid_cap=0.5, min_quant_numel=0, implementation="reference")
    chk = check_budget(model, None, optimizer=capped, fuse_optimizer=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    capped.step()
    assert chk.optimizer_state == _held(capped) != default.optimizer_state


def _static_need(model, spec):
    return check_budget(model, None, optimizer=spec, fuse_optimizer=False).static_peak


def test_ladder_picks_the_most_precise_policy_that_fits(capsys):
    model = _tiny()
    needs = {spec: _static_need(model, spec) for spec, *_ in TIER_LADDER}
    assert needs["hybrid"] > needs["int8/int8"] > needs["hybrid/int4"] > needs["int4/int4"]
    target = needs["int8/int8"]  # hybrid (fp32 embeddings) does not fit, int8 everywhere does
    compiled, opt = apply_optimizations(model, target_vram=target, fuse_optimizer=False, lower="eager")
    pol = compiled.ufx_report["optimizer_policy"]
    assert pol["chosen"] == "int8/int8"
    assert [(t["policy"], t["fits"]) for t in pol["tried"]] == [("hybrid", False), ("int8/int8", True)]
    assert "docs/benchmarks.md" in pol["why"]
    assert (opt.param_groups[0]["state_precision"], opt.param_groups[0]["high_precision_tier"]) == ("int8", "int8")
    assert "plan_memory{optimizer=int8/int8}" in compiled.ufx_report["options"]["pipeline"]
    assert compiled.ufx_report["check"]["static_peak"] == target  # the built optimizer, counted exactly
    assert "optimizer state int8/int8" in capsys.readouterr().out
    # a budget the default fits keeps the default
    compiled, opt = apply_optimizations(_tiny(), target_vram=needs["hybrid"], fuse_optimizer=False, lower="eager")
    assert compiled.ufx_report["optimizer_policy"]["chosen"] == "hybrid"
    assert opt.param_groups[0]["high_precision_tier"] == "fp32"


def test_fixed_tiers_are_not_searched_and_none_fitting_lists_every_policy():
    model = _tiny()
    target = _static_need(model, "int8/int8")
    with pytest.raises(InfeasibleBudget, match="before any activation"):
        apply_optimizations(model, target_vram=target, fuse_optimizer=False, lower="eager",
                            optimizer_options={"high_precision_tier": "fp32"})
    with pytest.raises(InfeasibleBudget, match=r"No HybridAdamW state policy fits; .*hybrid .*int8/int8 .*"
                                               r"hybrid/int4 .*int4/int4 ") as e:
        apply_optimizations(model, target_vram=_static_need(model, "int4/int4") - 2**10, fuse_optimizer=False,
                            lower="eager")
    # the smallest of them: int4 everywhere's static bytes, rounded up to a MiB as the check reports it
    assert e.value.smallest_feasible == -(-_static_need(model, "int4/int4") // 2**20) * 2**20


def test_ladder_traces_once_and_credits_the_chunking_passes(monkeypatch):
    import unsloth_fx.memory.whole as whole

    calls = []
    real = whole.trace_step

    def counting(*a, **k):
        calls.append(k.get("chunks"))
        return real(*a, **k)

    monkeypatch.setattr(whole, "trace_step", counting)
    floors = []
    real_cands = whole.minimum_candidates

    def counting_cands(joint, nfwd, st, *a, **k):
        floors.append((id(joint), st.optimizer, tuple(sorted(st.state_by_tier.items()))))
        return real_cands(joint, nfwd, st, *a, **k)

    monkeypatch.setattr(whole, "minimum_candidates", counting_cands)
    model = _tiny()
    # below hybrid's floor, so the ladder checks more than one policy with activations
    hyb = check_budget(model, None, optimizer="hybrid", seq_len=64, batch_size=2, fuse_optimizer=False, chunks=8)
    n = len(calls)
    floors.clear()
    # chunks=8: always chunked (chunks="auto" would first trace the unchunked step to decide; tested in test_api)
    compiled, _ = apply_optimizations(model, target_vram=hyb.smallest_feasible - 2**10, seq_len=64, batch_size=2,
                                      fuse_optimizer=False, lower="eager", chunks=8)
    rep = compiled.ufx_report
    assert rep["optimizer_policy"]["chosen"] != "hybrid" and len(rep["optimizer_policy"]["tried"]) >= 2
    assert len(calls) - n == n  # one trace per traced variant, reused by every policy and the final check
    # each policy's candidates predicted once per traced variant: the final check (offload counted) reuses the
    # ladder's (offload not counted; the same candidates but the offload one)
    assert floors and len(floors) == len(set(floors)), floors
    assert set(calls) == {8}
    assert any("chunked LM head" in a for a in rep["assumptions"])
    # the chunked trace's floor is below the unchunked one (no [tokens, vocab] fp32 logits: 4 MiB at 2 x 1024)
    # (eager timeline: every node materialized, as the figure above assumes)
    # (without offload: offloading the logits would lower the unchunked floor too)
    kw = dict(optimizer="hybrid", seq_len=1024, batch_size=2, fuse_optimizer=False, lower="eager", offload=False)
    plain, chunked = check_budget(model, None, **kw), check_budget(model, None, chunks=8, **kw)
    assert chunked.smallest_feasible + 4 * 2**20 <= plain.smallest_feasible
    # under Inductor's lowering (the check's default) the fp32 loss chain is fused; chunking still lowers the floor
    kw["lower"] = "inductor"
    plain, chunked = check_budget(model, None, **kw), check_budget(model, None, chunks=8, **kw)
    assert chunked.smallest_feasible < plain.smallest_feasible
    assert api.planner_optimizer_key(model, HybridAdamW(model.named_parameters(), state_precision="int4",
                                                        high_precision_tier="bf16")) == "int4/bf16"


def test_ladder_counts_offload_only_when_no_tier_fits_without_it():
    # tiny-qwen2 at 3 layers (traced whole), seq 512: a budget under every tier's floor without offload but
    # over int4/int4's with it. The first pass (no offload) refuses every tier; the second picks the most
    # precise tier that fits with offload, and says so. A budget that fits without offload never gets there.
    model = _tiny(num_hidden_layers=3)
    kw = dict(seq_len=512, batch_size=1, fuse_optimizer=True, lower="inductor", chunks=4)
    floors = {off: check_budget(model, None, optimizer="int4/int4", offload=off, **kw).smallest_feasible
              for off in (False, True)}
    assert floors[True] < floors[False]
    target = floors[True]
    with pytest.raises(InfeasibleBudget):
        check_budget(model, target, optimizer="int4/int4", offload=False, **kw)
    pol = api.choose_tier_policy(model, target, offload=True, **kw)
    assert [t["policy"] for t in pol["tried"] if not t["offload"]] == [p for p, *_ in TIER_LADDER]
    assert not any(t["fits"] for t in pol["tried"] if not t["offload"])
    assert pol["tried"][-1]["offload"] is True and pol["tried"][-1]["fits"] is True
    assert "offload" in pol["why"]
    # plan_memory{offload=false}: the ladder never counts offload, so nothing fits
    with pytest.raises(InfeasibleBudget):
        api.choose_tier_policy(model, target, offload=False, **kw)
    # a budget that fits without offload: the first pass decides
    easy = api.choose_tier_policy(model, floors[False], offload=True, **kw)
    assert not any(t["offload"] for t in easy["tried"])


def test_check_reserves_the_cuda_workspaces_plan_memory_reserves(monkeypatch):
    # plan_memory adds CUDA_WORKSPACE_RESERVE to a CUDA step's static bytes; a check without it accepted budgets
    # the compile then refused (a budget within 64 MiB of the floor). On CPU the reserve is 0; stand in for CUDA.
    from unsloth_fx.passes.plan_memory import CUDA_WORKSPACE_RESERVE

    model = _tiny()
    kw = dict(optimizer="int4/int4", seq_len=64, fuse_optimizer=True)
    assert api._workspace_reserve(model) == 0
    cpu = check_budget(model, None, **kw)
    monkeypatch.setattr(api, "_workspace_reserve", lambda m: CUDA_WORKSPACE_RESERVE)
    cuda = check_budget(model, None, **kw)
    assert cuda.smallest_feasible == cpu.smallest_feasible + CUDA_WORKSPACE_RESERVE
    assert cuda.static_peak == cpu.static_peak + CUDA_WORKSPACE_RESERVE
    with pytest.raises(InfeasibleBudget, match="CUDA library workspaces 64.00 MiB"):
        check_budget(model, cpu.smallest_feasible, **kw)


def test_a_pipeline_that_turns_offload_off_is_read_as_such():
    assert api._pipeline_offloads("default,plan_memory{optimizer={OPTIMIZER}}")
    assert not api._pipeline_offloads("default,plan_memory{optimizer={OPTIMIZER},offload=false},+split_token_chunks")
    assert not api._pipeline_offloads("default,plan_memory{offload=0}")
    assert api._pipeline_offloads("default,plan_memory{offload=true,h2d_gbps=10}")
