"""HybridAdamW's tier policy as a public function (``tier_for``), the per-role
override for embeddings / LM head (``high_precision_tier``), the planned state
layout the memory planner counts, and the kernels on an overridden tier."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from unsloth_fx.optim import HybridAdamW, param_groups, state_tensor_nbytes, tier_for  # noqa: E402
from unsloth_fx.runtime import adamw as K  # noqa: E402

# bytes per element of each tier's moment state, from the table in runtime/adamw.py
BPP = {"fp32": 8.0, "bf16": 4.0, "int8": 2 + 8 / 128, "int4": 1 + 8 / 128}


def _model(vocab=64, hidden=128):
    m = torch.nn.Module()
    m.embed_tokens = torch.nn.Embedding(vocab, hidden)
    m.proj = torch.nn.Linear(hidden, hidden)
    m.norm = torch.nn.LayerNorm(hidden)
    m.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    return m


@pytest.mark.parametrize("name,shape,kw,expect", [
    ("model.layers.0.mlp.up_proj.weight", (256, 64), {}, "hybrid"),
    ("model.embed_tokens.weight", (256, 64), {}, "fp32"),
    ("lm_head.weight", (256, 64), {}, "fp32"),
    ("lm_head.weight", (256, 64), {"high_precision_tier": "int4"}, "int4"),
    ("model.embed_tokens.weight", (256, 64), {"high_precision_tier": "bf16"}, "bf16"),
    ("model.norm.weight", (64,), {"high_precision_tier": "int4"}, "fp32"),  # norms stay fp32
    ("model.layers.0.input_layernorm.weight", (256, 64), {"high_precision_tier": "int4"}, "fp32"),
    ("proj.bias", (256, 64), {"high_precision_tier": "int8"}, "fp32"),
    ("tiny.weight", (8, 8), {"high_precision_tier": "int8"}, "fp32"),  # under min_quant_numel
    ("tiny.weight", (8, 8), {"min_quant_numel": 0}, "hybrid"),
    (None, (256, 64), {}, "hybrid"),  # no name: only the shape rules apply
    ("lm_head.weight", (256, 64), {"quantize_all": True}, "hybrid"),
    ("model.norm.weight", (64,), {"quantize_all": True}, "hybrid"),
])
def test_tier_for_table(name, shape, kw, expect):
    assert tier_for(name, shape, "hybrid", **kw) == expect


def test_tier_for_full_precision_state_applies_everywhere():
    for sp in ("fp32", "bf16"):
        assert tier_for("lm_head.weight", (256, 64), sp, high_precision_tier="int4") == sp
        assert tier_for("model.norm.weight", (64,), sp) == sp


def test_state_tensor_nbytes_matches_init_state():
    for tier in ("fp32", "bf16", "int8", "int4", "hybrid"):
        for n in (1, 127, 128, 4097, 64 * 130):
            st = K.init_state(tier, torch.empty(n), hybrid_bits=8, hybrid_cap=0.25)
            assert state_tensor_nbytes(tier, n, hybrid_bits=8, hybrid_cap=0.25) == tuple(
                t.numel() * t.element_size() for t in st.values()), (tier, n)
    # the hybrid pool is allocated at the cap: 2 x 4 bytes x 128 per capped block
    assert sum(state_tensor_nbytes("hybrid", 128 * 100, hybrid_cap=0.1)) == (
        64 * 100 * 2 + 4 * 100 * 2 + 4 * 100 * 2 + 10 * 128 * 8)


@pytest.mark.parametrize("override", ["bf16", "int8", "int4"])
def test_override_sets_embedding_and_head_tiers_and_state_bytes(override):
    torch.manual_seed(0)
    m = _model()
    opt = HybridAdamW(m.named_parameters(), state_precision="int8", high_precision_tier=override, min_quant_numel=0)
    planned = opt.state_layout()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 0.1
    opt.step()
    tiers = {n: opt.state[p]["tier"] for n, p in m.named_parameters()}
    assert tiers == {"embed_tokens.weight": override, "proj.weight": "int8", "proj.bias": "fp32",
                     "norm.weight": "fp32", "norm.bias": "fp32", "lm_head.weight": override}
    # embeddings + head 2 x 64 x 128 elements at the override's bytes, proj at int8, 1-D fp32
    n_emb, n_proj, n_1d = 2 * 64 * 128, 128 * 128, 3 * 128
    expect = n_emb * BPP[override] + n_proj * BPP["int8"] + n_1d * BPP["fp32"]
    assert opt.state_bytes() == pytest.approx(expect)
    # what the planner counts before the first step is what the step allocated
    assert opt.state_layout() == planned
    assert sum(sum(s) for _, _, s in planned) == opt.state_bytes() + 6 * 8  # 6 tensors: + step, nonfinite_skips


def test_default_keeps_todays_fp32_embeddings():
    m = _model()
    opt = HybridAdamW(m.named_parameters(), state_precision="int4", min_quant_numel=0)
    assert {n: t for n, t, _ in opt.state_layout()}["lm_head.weight"] == "fp32"
    with pytest.raises(ValueError, match="high_precision_tier"):
        HybridAdamW(m.named_parameters(), high_precision_tier="int2")


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("override", ["bf16", "int4"])
def test_kernel_runs_the_overridden_tier_and_matches_reference(override):
    torch.manual_seed(1)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.to(torch.bfloat16)
    ok = HybridAdamW(a.named_parameters(), lr=1e-2, state_precision="hybrid", high_precision_tier=override,
                     min_quant_numel=0, seed=3)
    ref = HybridAdamW(b.named_parameters(), lr=1e-2, state_precision="hybrid", high_precision_tier=override,
                      min_quant_numel=0, seed=3, implementation="reference")
    assert K.uses_triton(a.lm_head.weight)  # TRITON_INTERPRET=1: the Triton kernel, in the interpreter
    w0 = a.lm_head.weight.detach().clone()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = (torch.randn(pa.shape, generator=gen) * 0.1).to(pa.dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
        ok.step()
        ref.step()
    assert ok.state[a.lm_head.weight]["tier"] == override
    assert ok.state[a.embed_tokens.weight]["tier"] == override
    assert not torch.equal(a.lm_head.weight, w0)  # it moved
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.float(), pb.float(), rtol=2 ** -7, atol=1e-6, msg=n)


def test_param_groups_with_override():
    m = _model()
    groups = param_groups(m, "hybrid", high_precision_tier="int4")
    by = {g["state_precision"]: {id(p) for p in g["params"]} for g in groups}
    assert by["int4"] == {id(m.embed_tokens.weight), id(m.lm_head.weight)}
    assert by["hybrid"] == {id(m.proj.weight)}
    assert [g["state_precision"] for g in param_groups(m, "int8")] == ["fp32", "int8"]  # as before


def test_state_dict_from_before_the_option_loads():
    m = _model()
    opt = HybridAdamW(m.named_parameters(), state_precision="int8", min_quant_numel=0)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["high_precision_tier"]
    opt2 = HybridAdamW(m.named_parameters(), state_precision="int8", min_quant_numel=0)
    opt2.load_state_dict(sd)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt2.step()
    assert opt2.state[m.lm_head.weight]["tier"] == "fp32"
