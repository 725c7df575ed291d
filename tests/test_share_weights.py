"""share_weights: detection against a null, exact recovery of planted sharing, apply, the pass.

Planted structure (weights drawn N(0, 0.02) from a fixed generator):
(a) a Qwen2-shaped model's layer-2 FFN is layer 0's with permuted neurons,
(b) layer 3's o_proj is layer 1's plus a rank-16 difference (30% of its norm),
(c) in a DeepseekV3-shaped model, experts 5 and 7 are sign-permuted copies of experts 1 and 2.
Dimensions are small but wide enough (hidden 512) that index/sign storage is < 0.1% of a unit.
"""

import copy
import json

import pytest
import torch

from unsloth_fx.sharing import (
    apply_sharing, find_shared, is_shared, procrustes_residual, storage_bytes,
)
from unsloth_fx.sharing.report import SCHEMA
from unsloth_fx.zoo import build_model

H, I, L = 512, 256, 4


def _qwen(**over):
    cfg = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=4,
               use_cache=False)
    cfg.update(over)
    m = build_model("tiny-qwen2", device="cpu", **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def _plant_ffn(m, perm):
    a, b = m.model.layers[0].mlp, m.model.layers[2].mlp
    with torch.no_grad():
        b.gate_proj.weight.copy_(a.gate_proj.weight[perm])
        b.up_proj.weight.copy_(a.up_proj.weight[perm])
        b.down_proj.weight.copy_(a.down_proj.weight[:, perm])


def _plant_lowrank(m):
    g = torch.Generator().manual_seed(2)
    o1, o3 = m.model.layers[1].self_attn.o_proj, m.model.layers[3].self_attn.o_proj
    with torch.no_grad():
        d = torch.randn(H, 16, generator=g) @ torch.randn(16, H, generator=g)
        o3.weight.copy_(o1.weight + d * (0.3 * o1.weight.norm() / d.norm()))


PERM = torch.randperm(I, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def planted_qwen():
    m = _qwen()
    _plant_ffn(m, PERM)
    _plant_lowrank(m)
    return m


@pytest.fixture(scope="module")
def planted_report(planted_qwen):
    return find_shared(planted_qwen, tolerance=0.01)


def _ids(seq_len=12, vocab=512):
    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(4))


# ------------------------------------------------------------------- detection


def test_planted_pairs_recovered_exactly_and_nothing_else(planted_report):
    acc = {(c.base, c.freed): c for c in planted_report.accepted}
    assert set(acc) == {("model.layers.0.mlp", "model.layers.2.mlp"),
                        ("model.layers.1.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight")}
    ffn = acc["model.layers.0.mlp", "model.layers.2.mlp"]
    assert ffn.transform == "neuron_perm" and ffn.rank == 0 and ffn.residual == 0.0
    assert torch.equal(ffn.payload["perm"], PERM)  # the exact planted permutation
    assert bool((ffn.payload["sign"] == 1).all())
    lr = acc["model.layers.1.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    assert lr.transform == "identity" and lr.rank == 16
    assert lr.residual_transform == pytest.approx(0.3 / (1 + 0.09) ** 0.5, rel=0.1)  # before the correction
    assert lr.residual < 1e-5 and lr.act_err < 1e-5


def test_screen_scores_sit_far_below_the_null_only_for_planted_pairs(planted_report):
    for c in planted_report.candidates:
        planted = (c.base, c.freed) in {("model.layers.0.mlp", "model.layers.2.mlp"),
                                        ("model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.gate_proj.weight"),
                                        ("model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"),
                                        ("model.layers.1.self_attn.o_proj.weight",
                                         "model.layers.3.self_attn.o_proj.weight")}
        assert c.null_min is not None and c.null_min > 0.1
        assert c.screened == planted, (c.base, c.freed, c.score, c.null_min, c.z)
        if planted:
            assert c.score < c.null_min and c.z < -10
            if "o_proj" not in c.base:  # exact copies (up to a signed permutation) score ~0
                assert c.score < 1e-5


def test_subsumed_single_matrix_pairs_are_reported_as_overlaps(planted_report):
    rows = {(c.base, c.freed): c for c in planted_report.candidates}
    gate = rows["model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.gate_proj.weight"]
    assert gate.transform == "signed_perm" and gate.verdict == "rejected" and "overlaps" in gate.reason


def test_negative_control_independent_weights_accept_nothing():
    rep = find_shared(_qwen(), tolerance=0.01)
    assert rep.candidates and not rep.accepted
    assert rep.total_bytes_saved == 0
    assert all(c.score >= 0.5 * c.null_min for c in rep.candidates)
    # The seed's Q(L) / K(L+1) pairs: dense Procrustes "fits" unrelated weights as well as it fits the null.
    assert len(rep.seed_pairs) == L - 1
    for p in rep.seed_pairs:
        assert 0.65 < p.residual < 0.77 and abs(p.residual - p.residual_null) < 0.03
        assert p.q_bytes == H * H * 4 and p.verdict.startswith("rejected")


def test_procrustes_fits_independent_gaussians_with_relative_residual_071():
    g = torch.Generator().manual_seed(5)
    res = [procrustes_residual(torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)) for _ in range(3)]
    assert all(abs(r - 0.71) < 0.02 for r in res), res


def test_seed_pairs_not_applicable_under_gqa():
    rep = find_shared(_qwen(num_key_value_heads=2, num_hidden_layers=2), tolerance=0.01)
    assert rep.seed_pairs[0].verdict.startswith("not applicable: shapes differ")


# ------------------------------------------------------------------- apply


def test_apply_ffn_copy_gives_identical_logits_and_the_predicted_saving():
    m = _qwen()
    _plant_ffn(m, PERM)
    ids = _ids()
    ref = m(ids).logits
    rep = find_shared(m, tolerance=0.01)
    assert [c.freed for c in rep.accepted] == ["model.layers.2.mlp"]
    before = storage_bytes(m)
    apply_sharing(m, rep)
    after = storage_bytes(m)
    assert is_shared(m)
    assert torch.equal(m(ids).logits, ref)  # bit for bit
    realised = before["parameters"] + before["buffers"] - after["parameters"] - after["buffers"]
    planted = 3 * I * H * 4
    assert realised == rep.total_bytes_saved
    assert abs(realised - planted) / planted < 1e-3
    assert before["numel"] - after["numel"] == 3 * I * H


def test_apply_lowrank_pair_within_tolerance(planted_qwen):
    m = copy.deepcopy(planted_qwen)
    ids = _ids()
    ref = m(ids).logits
    rep = find_shared(m, tolerance=0.01)
    apply_sharing(m, rep)
    w3 = m.model.layers[3].self_attn.o_proj.weight
    torch.testing.assert_close(w3, planted_qwen.model.layers[3].self_attn.o_proj.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-5)
    lr = m.model.layers[3].self_attn.o_proj._ufx_weight
    assert lr.left.shape == (H, 16) and lr.right.shape == (16, H) and lr.left.requires_grad


def _tiny_ds(**over):
    cfg = dict(hidden_size=H, moe_intermediate_size=64, intermediate_size=256, n_routed_experts=8, use_cache=False)
    cfg.update(over)
    m = build_model("tiny-deepseek-v3", device="cpu", **cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


EXPERT_PLANTS = {5: (1, 7), 7: (2, 8)}  # freed expert -> (base expert, seed)


def _plant_experts(m):
    ex = m.model.layers[1].mlp.experts
    inter = ex.down_proj.shape[-1]
    truth = {}
    with torch.no_grad():
        for e, (src, s) in EXPERT_PLANTS.items():
            g = torch.Generator().manual_seed(s)
            perm = torch.randperm(inter, generator=g)
            sign = torch.randint(0, 2, (inter,), generator=g).float() * 2 - 1
            ex.gate_up_proj[e, :inter] = ex.gate_up_proj[src, :inter][perm]
            ex.gate_up_proj[e, inter:] = ex.gate_up_proj[src, inter:][perm] * sign[:, None]
            ex.down_proj[e] = ex.down_proj[src][:, perm] * sign[None, :]
            truth[e] = (src, perm, sign)
    return truth


def test_sign_permuted_experts_recovered_applied_with_identical_logits():
    m = _tiny_ds()
    truth = _plant_experts(m)
    ids = _ids()
    ref = m(ids).logits
    rep = find_shared(m, tolerance=0.01)
    acc = {c.freed: c for c in rep.accepted}
    assert set(acc) == {f"model.layers.1.mlp.experts[{e}]" for e in EXPERT_PLANTS}  # zero false positives
    for e, (src, perm, sign) in truth.items():
        c = acc[f"model.layers.1.mlp.experts[{e}]"]
        assert c.base == f"model.layers.1.mlp.experts[{src}]" and c.transform == "neuron_perm"
        assert torch.equal(c.payload["perm"], perm) and torch.equal(c.payload["sign"], sign)
    before = storage_bytes(m)
    apply_sharing(m, rep)
    after = storage_bytes(m)
    assert torch.equal(m(ids).logits, ref)
    ex = m.model.layers[1].mlp.experts
    assert ex._ufx_gate_up_proj.base.shape[0] == 6  # 8 experts, 2 stored as transforms
    realised = before["parameters"] + before["buffers"] - after["parameters"] - after["buffers"]
    planted = 2 * 3 * 64 * H * 4
    assert realised == rep.total_bytes_saved
    assert abs(realised - planted) / planted < 1e-3


# ------------------------------------------------------------------- gradients and optimizer state


def test_shared_parameter_gradient_is_the_sum_of_both_uses_and_optimizer_state_shrinks():
    planted = _qwen()
    _plant_ffn(planted, PERM)
    shared = copy.deepcopy(planted)
    apply_sharing(shared, find_shared(shared, tolerance=0.01))
    ids = _ids()
    planted(ids).logits.square().mean().backward()
    shared(ids).logits.square().mean().backward()
    a, b = planted.model.layers[0].mlp, planted.model.layers[2].mlp
    want_gate = a.gate_proj.weight.grad.clone().index_add_(0, PERM, b.gate_proj.weight.grad)
    want_down = a.down_proj.weight.grad.clone().index_add_(1, PERM, b.down_proj.weight.grad)
    got = shared.model.layers[0].mlp
    torch.testing.assert_close(got.gate_proj.weight.grad, want_gate, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.down_proj.weight.grad, want_down, rtol=1e-5, atol=1e-9)
    assert shared.model.layers[2].mlp.gate_proj._ufx_weight.base is got.gate_proj.weight

    def grad_and_state_bytes(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        return grads, state

    g0, s0 = grad_and_state_bytes(planted)
    g1, s1 = grad_and_state_bytes(shared)
    freed = 3 * I * H * 4
    assert g0 - g1 == freed
    assert s0 - s1 >= 2 * freed  # exp_avg and exp_avg_sq (plus the step counters)


# ------------------------------------------------------------------- bad input and report format


def test_no_candidates_report_says_so():
    rep = find_shared(_qwen(num_hidden_layers=1), tolerance=0.01)
    assert rep.candidates == [] and "No candidates" in rep.to_markdown()


def test_tied_embeddings_are_listed_not_paired():
    m = _qwen(tie_word_embeddings=True, num_hidden_layers=2)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rep = find_shared(m, tolerance=0.01)
    assert ["model.embed_tokens.weight", "lm_head.weight"] in rep.tied
    assert not any("embed_tokens" in c.base or "lm_head" in c.freed for c in rep.candidates)
    assert "already tied" in rep.to_markdown()


def test_meta_parameters_give_a_shapes_only_report_and_cannot_be_applied():
    m = build_model("tiny-qwen2", device="meta", num_hidden_layers=3)
    rep = find_shared(m, tolerance=0.01)
    assert rep.mode == "shapes-only" and rep.candidates
    assert {c.verdict for c in rep.candidates} == {"shapes-only"}
    with pytest.raises(ValueError, match="real weights"):
        apply_sharing(m, rep)


def test_frozen_versus_trainable_pair_is_rejected_not_shared():
    m = _qwen()
    _plant_ffn(m, PERM)
    for p in m.model.layers[2].mlp.parameters():
        p.requires_grad_(False)
    rep = find_shared(m, tolerance=0.01)
    assert not rep.accepted
    c = next(c for c in rep.candidates if c.freed == "model.layers.2.mlp")
    assert c.screened and c.residual == 0.0 and "requires_grad differs" in c.reason


def test_report_json_and_markdown_format(planted_report):
    d = json.loads(planted_report.to_json())
    assert d["schema"] == SCHEMA and d["summary"]["accepted"] == 2
    assert d["summary"]["candidates"] == len(d["candidates"]) == len(planted_report.candidates)
    assert "changes the model" in d["changes_model"] and "random N(0, I)" in d["calibration"]
    for c in d["candidates"]:
        assert c["verdict"] in ("accepted", "rejected") and set(c) >= {
            "role", "base", "freed", "score", "null_min", "null_mean", "z", "residual", "residual_null",
            "act_err", "bytes_saved", "transform", "verdict", "reason"}
        assert c["verdict"] == "accepted" or c["reason"]
    md = planted_report.to_markdown(max_rows=5)
    assert "| role | base | freed | score | null min/mean |" in md
    assert md.count("| accepted |") == 2 and "more candidates (all in share_weights.json)" in md
    assert "## The seed's pairs" in md


def test_detection_is_deterministic(planted_qwen, planted_report):
    again = find_shared(planted_qwen, tolerance=0.01)
    strip = lambda r: [{k: v for k, v in c.to_dict().items()} for c in r.candidates]  # noqa: E731
    assert strip(again) == strip(planted_report)


# ------------------------------------------------------------------- the pass through the backend


def _compile_run(m, options):
    import unsloth_fx.backend as backend

    opts = {"lower": "eager", **options}
    cm = torch.compile(m, backend="unsloth", options=opts)
    out = cm(_ids()).logits
    out.sum().backward()
    return out, backend.LAST


def test_pass_report_mode_through_the_backend(tmp_path, capsys):
    m = _qwen(num_hidden_layers=3, hidden_size=128)  # narrower: compiling is the slow part here
    _plant_ffn(m, PERM)
    torch._dynamo.reset()
    out, last = _compile_run(m, {"share_weights": "report", "dump": str(tmp_path)})
    torch.testing.assert_close(out, m(_ids()).logits, rtol=1e-4, atol=1e-5)
    stats = last["ctx"].stats["joint"]["share_weights"]
    assert stats["modified"] is False and stats["report_mode"] == "values" and stats["accepted"] == 1
    assert stats["bytes_saved_if_applied"] == 3 * I * 128 * 4 - I * 5  # minus int32 perm + int8 sign
    rep = json.loads((tmp_path / "graph_000" / "share_weights.json").read_text())
    assert rep["summary"]["accepted"] == 1 and rep["candidates"][0]["freed"]
    assert "| accepted |" in (tmp_path / "graph_000" / "share_weights.md").read_text()
    assert "# share_weights report" in capsys.readouterr().out
    # Idempotent: running the pass again on its output changes nothing and reuses the report.
    from unsloth_fx.pass_base import get_pass

    ctx = last["ctx"]
    res = get_pass("share_weights").run(last["joint"], ctx)
    assert res.modified is False and res.graph_module is last["joint"]


def test_pass_apply_mode_names_the_fix_then_confirms_after_apply_sharing():
    m = _qwen(num_hidden_layers=3, hidden_size=128)
    _plant_ffn(m, PERM)
    torch._dynamo.reset()
    # Dynamo wraps the pass's PassFailure in BackendCompilerFailed; the message names the fix.
    with pytest.raises(Exception, match=r"cannot free parameters from inside torch.compile") as e:
        _compile_run(m, {"share_weights": "apply"})
    assert "apply_sharing(model, report)" in str(e.value) and "pass 'share_weights'" in str(e.value)
    ref = m(_ids()).logits
    apply_sharing(m, find_shared(m, tolerance=0.01))
    torch._dynamo.reset()
    out, last = _compile_run(m, {"share_weights": "apply"})
    assert torch.equal(out, ref) or torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    stats = last["ctx"].stats["joint"]["share_weights"]
    assert stats["modified"] is False and stats["shared_inputs"] >= 1
    assert m.model.layers[0].mlp.gate_proj.weight.grad is not None
