"""Static bytes of the memory model: HybridAdamW's state counted exactly per parameter
(its own tier policy and allocation), optimizer instances, and the fused update
freeing each gradient inside backward."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from unsloth_fx.memory import model as M  # noqa: E402
from unsloth_fx.memory.trace import trace_function  # noqa: E402
from unsloth_fx.optim import HybridAdamW  # noqa: E402

KiB = 1024


def _model():
    m = torch.nn.Module()
    m.embed_tokens = torch.nn.Embedding(256, 64)  # 16384 elements
    m.up_proj = torch.nn.Linear(64, 160, bias=False)  # 10240
    m.norm = torch.nn.LayerNorm(64)  # 2 x 64
    m.lm_head = torch.nn.Linear(64, 256, bias=False)  # 16384
    m.tiny = torch.nn.Linear(16, 16, bias=False)  # 256: under min_quant_numel
    return m


def _rows(m):
    return [(p.numel(), p.dtype, True, False, n, tuple(p.shape)) for n, p in m.named_parameters()]


def _allocated(opt):
    """Device bytes of the state the optimizer really holds, each tensor rounded as the allocator does."""
    return sum(M.round_block(t.numel() * t.element_size()) for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("spec,kw", [
    ("hybrid", {}),
    ("int8", {"state_precision": "int8"}),
    ("int4", {"state_precision": "int4"}),
    ("hybrid/int4", {"high_precision_tier": "int4"}),
    ("int8/int8", {"state_precision": "int8", "high_precision_tier": "int8"}),
    ("hybrid/bf16", {"high_precision_tier": "bf16"}),
])
def test_hybrid_state_is_exact_per_parameter(spec, kw):
    torch.manual_seed(0)
    m = _model()
    opt = HybridAdamW(m.named_parameters(), implementation="reference", **kw)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    st = M.static_breakdown(_rows(m), spec)
    assert st.optimizer_state == _allocated(opt)
    assert st.optimizer == spec
    # by tier: what the optimizer chose for each parameter
    tiers = {}
    for p, s in opt.state.items():
        tiers[s["tier"]] = tiers.get(s["tier"], 0) + sum(
            M.round_block(t.numel() * t.element_size()) for t in s.values() if isinstance(t, torch.Tensor))
    assert st.state_by_tier == tiers
    # an instance is counted from its own layout, before and after its first step
    fresh = HybridAdamW(_model().named_parameters(), **kw)
    assert M.static_breakdown(_rows(m), fresh).optimizer_state == st.optimizer_state
    assert M.static_breakdown(_rows(m), opt).optimizer_state == st.optimizer_state


def test_embeddings_dominate_the_default_hybrid_state():
    m = _model()
    default = M.static_breakdown(_rows(m), "hybrid")
    cheap = M.static_breakdown(_rows(m), "hybrid/int4")
    # embed + lm_head: 2 x 16384 elements; fp32: two 64 KiB moments each, vs int4: 8 KiB of codes
    # and 512 B of scales per moment; each also has two 0-d counters (one 512 B block each)
    counters = 2 * M.BLOCK
    assert default.state_by_tier["fp32"] - cheap.state_by_tier["fp32"] == 2 * (2 * 16384 * 4 + counters)
    assert cheap.state_by_tier["int4"] == 2 * (2 * 8192 + 2 * 512 + counters)
    assert any("embeddings / LM head int4" in a for a in cheap.assumptions)
    assert any("hybrid_cap=0.1" in a for a in default.assumptions)


def test_legacy_rows_and_bad_specs():
    # rows without name/shape keep the flat bytes/parameter table
    f = M.static_breakdown([(1000, torch.bfloat16, True, False)], "int4", fuse_optimizer=True)
    assert f.gradients == 0 and f.optimizer_state == 1024
    with pytest.raises(ValueError, match="optimizer='lion'"):
        M.static_breakdown([], "lion")
    with pytest.raises(ValueError, match="hybrid/int4"):
        M.static_breakdown([], "adamw/int4")
    assert M.parse_optimizer("hybrid/int4")[1] == M.StatePolicy(high_precision_tier="int4")
    assert M.StatePolicy(high_precision_tier="int4").key == "hybrid/int4"


def test_torch_adamw_instance_counts_moments_in_parameter_dtype():
    m = _model().to(torch.bfloat16)
    opt = torch.optim.AdamW(m.named_parameters())
    st = M.static_breakdown(_rows(m), opt)
    assert st.optimizer_state == sum(2 * M.round_block(p.numel() * 2) for p in m.parameters())


# ---------------------------------------------------------------- fused update frees gradients


def _two_matmuls():
    w1 = torch.randn(256, 512, requires_grad=True)  # 512 KiB
    w2 = torch.randn(512, 128, requires_grad=True)  # 256 KiB
    x = torch.randn(64, 256)
    return trace_function(lambda w1, w2, x: (torch.relu(x @ w1) @ w2).sum(), [w1, w2, x], {0: "w1", 1: "w2"})


def _live_grads(tl):
    live, top = 0, 0
    for e in tl.events:
        if e.category == "gradients":
            live += e.bytes if e.kind == "alloc" else -e.bytes
            top = max(top, live)
    return top, live


def test_fused_update_frees_each_gradient_after_its_last_read():
    joint, nfwd = _two_matmuls()
    plain = M.predict(joint, nfwd, M.static_from_graph(joint, "int8"), how="default")
    # one update call per parameter (fuse_optimizer{group_bytes=0})
    fused_static = M.static_from_graph(joint, "int8", fuse_optimizer=True, fuse_group_bytes=0)
    fused = M.predict(joint, nfwd, fused_static, how="default")
    assert _live_grads(plain) == (768 * KiB, 768 * KiB)  # both gradients alive at the end of backward
    top, end = _live_grads(fused)
    assert end == 0 and top == 512 * KiB  # never both at once
    # grouped (the pass's default cap, 64 MiB): both gradients wait for the one group call
    grouped_static = M.static_from_graph(joint, "int8", fuse_optimizer=True)
    assert _live_grads(M.predict(joint, nfwd, grouped_static, how="default")) == (768 * KiB, 0)
    assert grouped_static.optimizer_temp == 768 * KiB  # the group's gradients; the update itself allocates none
    # a cap under both gradients' sum: one group each again
    assert _live_grads(M.predict(joint, nfwd, M.static_from_graph(joint, "int8", fuse_optimizer=True,
                                                                   fuse_group_bytes=700 * KiB),
                                 how="default")) == (512 * KiB, 0)
    # an int8-tier update allocates nothing of its own (the non-finite check reads a 0-d norm, no
    # isfinite mask): the gradient is the largest thing in flight
    ups = [e for e in fused.events if e.node.startswith("fused update") and e.kind == "alloc"]
    assert sum(e.bytes for e in ups) == 0
    assert fused_static.gradients == 0 and fused_static.optimizer_temp == 512 * KiB
    # w2's gradient (mm_2) is final before mm_3 = tangent @ t(w2) runs; the update waits for that read
    bw = [(e.node, e.kind) for e in fused.events if e.phase == "backward"]
    assert bw.index(("mm_2", "alloc")) < bw.index(("mm_3", "alloc")) < bw.index(("fused update mm_2", "alloc")) \
        < bw.index(("mm_2", "free"))
    assert fused.peak < plain.peak


def test_an_adamw_built_from_unnamed_parameters_is_counted_in_order():
    # torch.optim.AdamW(model.parameters()) has no param_names: its k-th parameter is the k-th trainable row
    rows = [(64, torch.float32, True, False, "a", (8, 8)), (16, torch.float32, False, False, "frozen", (16,)),
            (32, torch.float32, True, False, "b", (32,))]
    ps = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(32))]
    st = M.static_breakdown(rows, torch.optim.AdamW(ps))
    assert st.optimizer_state == 2 * M.round_block(64 * 4) + 2 * M.round_block(32 * 4)
    with pytest.raises(ValueError, match="not held by"):  # named optimizers still must hold every row by name
        M.static_breakdown(rows, torch.optim.AdamW([("a", ps[0]), ("c", ps[1])]))
