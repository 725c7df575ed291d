"""Fused, chunked LM head + cross-entropy: the runtime op
``torch.ops.unsloth_fx.linear_cross_entropy``, the ``fuse_linear_cross_entropy``
pre_grad pass and ``patch_causal_lm``.

Specification: the loss equals transformers' ``ForCausalLMLoss`` (label shift,
ignore_index=-100, mean over non-ignored tokens, fp32 upcast) and so do the
gradients of every parameter; no graph node ever has the full
``[tokens, vocab]`` shape.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import FileCheck

import unsloth_fx.backend as backend
from unsloth_fx.options import Options
from unsloth_fx.pass_base import PassContext, get_pass, ufx
from unsloth_fx.passes.chunk_recompute import planned_chunks
from unsloth_fx.runtime.linear_cross_entropy import causal_lm_loss, linear_cross_entropy, patch_causal_lm

from _support import twin_models

OP = torch.ops.unsloth_fx.linear_cross_entropy.default
PIPE = "default,+fuse_linear_cross_entropy{chunks=3}"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _reference(h, w, y, ignore_index=-100, reduction="mean"):
    """What HF computes: logits in the weight dtype, fp32 upcast, flattened cross_entropy."""
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def _inputs(tokens, hidden, vocab, dtype, ignored=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[torch.rand(tokens, generator=g) < ignored] = -100
    return h, w, y


def _check_op(h, w, y, chunks=4, chunk_size=0, reduction="mean"):
    ref = _reference(h, w, y, reduction=reduction)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    out = linear_cross_entropy(h, w, y, chunks=chunks, chunk_size=chunk_size, reduction=reduction)
    gh, gw = torch.autograd.grad(out, (h, w))
    tol = TOL[h.dtype]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[torch.float32], equal_nan=True)
    torch.testing.assert_close(gh, gh_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)


# --- the op -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,chunks", [(24, 4), (25, 4), (3, 8), (1, 1), (7, 7)])
def test_op_matches_cross_entropy_loss_and_gradients(dtype, tokens, chunks):
    # 25 tokens / 4 chunks: uneven last chunk; 3 tokens / 8 chunks: fewer tokens than chunks.
    _check_op(*_inputs(tokens, 16, 40, dtype, ignored=0.3), chunks=chunks)


@given(tokens=st.integers(1, 40), vocab=st.integers(2, 70), chunks=st.integers(1, 9),
       chunk_size=st.sampled_from([0, 0, 1, 5, 64]), ignored=st.sampled_from([0.0, 0.5, 0.9]),
       reduction=st.sampled_from(["mean", "sum"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_op_property_any_chunking_gives_the_unchunked_result(tokens, vocab, chunks, chunk_size, ignored,
                                                             reduction, dtype):
    _check_op(*_inputs(tokens, 8, vocab, dtype, ignored), chunks=chunks, chunk_size=chunk_size, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_gives_hf_value_and_zero_not_nan_gradients(dtype):
    h, w, y = _inputs(10, 8, 20, dtype)
    y[:] = -100
    ref = _reference(h, w, y)
    out = linear_cross_entropy(h, w, y, chunks=3)
    assert torch.isnan(ref) and torch.isnan(out)  # mean over zero tokens: 0/0, as F.cross_entropy / HF
    gh, gw = torch.autograd.grad(out, (h, w))
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    assert torch.equal(gh_ref, gh) and torch.equal(gw_ref, gw)
    assert linear_cross_entropy(h, w, y, reduction="sum").item() == 0.0


def test_causal_lm_loss_shifts_labels_like_hf():
    from transformers.loss.loss_utils import ForCausalLMLoss

    h, w, _ = _inputs(2 * 9, 8, 30, torch.float32)
    h3 = h.detach().view(2, 9, 8)
    labels = torch.randint(0, 30, (2, 9))
    labels[1, :4] = -100
    ref = ForCausalLMLoss(h3 @ w.detach().t(), labels, vocab_size=30)
    torch.testing.assert_close(causal_lm_loss(h3, w.detach(), labels, chunks=4), ref)


def test_op_is_a_well_formed_torch_library_op():
    h, w, y = _inputs(9, 8, 20, torch.float32, ignored=0.3)
    torch.library.opcheck(OP, (h, w, y, -100, 4, 0, "mean", True))


@pytest.mark.parametrize("args,match", [
    (dict(y=torch.zeros(5, dtype=torch.long)), "5 labels for 6 hidden rows"),
    (dict(reduction="none"), "reduction='none'"),
    (dict(chunks=0), "chunks=0"),
    (dict(w=torch.randn(20, 7)), "does not end in weight's hidden size 7"),
    (dict(w=torch.randn(20, 8, dtype=torch.float64)), "cast one"),
    (dict(y=torch.zeros(6)), "labels must be int64"),
    (dict(y=torch.tensor([0, 1, 2, 99, -100, 3])), "outside \\[0, vocab\\)"),
])
def test_bad_inputs_raise_errors_that_name_the_problem(args, match):
    h, w, y = torch.randn(6, 8), torch.randn(20, 8), torch.zeros(6, dtype=torch.long)
    kw = dict(h=h, w=w, y=y, reduction="mean", chunks=4)
    kw.update(args)
    with pytest.raises(Exception, match=match):
        linear_cross_entropy(kw["h"], kw["w"], kw["y"], chunks=kw["chunks"], reduction=kw["reduction"])


def test_backward_without_saved_gradients_raises():
    h, w, y = _inputs(6, 8, 20, torch.float32)
    loss = OP(h, w, y, -100, 2, 0, "mean", False)[0]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_planned_chunks_prefers_the_memory_plan():
    ctx = PassContext(options=Options())
    assert planned_chunks(ctx, "lm_head", 4) == 4
    ctx.shared["memory_plan"] = {"chunks": {"lm_head": 16, "default": 2}}
    assert planned_chunks(ctx, "lm_head", 4) == 16 and planned_chunks(ctx, "mlp", 4) == 2


# --- the pass, end to end through the backend -------------------------------------------------

def _pair(name, dtype=torch.float32, seq=13):
    ref, ours = twin_models(name, dtype)
    ids = torch.randint(0, ref.config.vocab_size, (2, seq))
    labels = ids.clone()
    labels[0, :5] = -100
    return ref, patch_causal_lm(ours), ids, labels


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    plain = getattr(model, "_orig_mod", model)
    return out, {n: p.grad.detach().clone() for n, p in plain.named_parameters() if p.grad is not None}


def _full_logit_nodes(gm, tokens, vocab):
    """Nodes whose value has a vocab-sized dim and a multiple of ``tokens x vocab`` elements
    (``[tokens, vocab]``, ``[batch, seq, vocab]``, transposes). Tests pick ``tokens`` so that no
    weight (``[vocab, hidden]`` embeddings, LM head) fits this by accident."""
    bad = []
    for n in gm.graph.nodes:
        vals = n.meta.get("val", n.meta.get("example_value"))
        for v in vals if isinstance(vals, (tuple, list)) else [vals]:
            if isinstance(v, torch.Tensor) and vocab in tuple(v.shape) and v.numel() % (tokens * vocab) == 0 and v.numel():
                bad.append(f"{n.name}{tuple(v.shape)}")
    return bad


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "tiny-deepseek-v3"])
def test_fused_training_step_matches_hf_and_never_builds_full_logits(name):
    torch._dynamo.reset()
    ref, ours, ids, labels = _pair(name)
    compiled = torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": PIPE})
    out, g = _step(compiled, ids, labels)
    ref_out, g_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL[torch.float32])
    assert g.keys() == g_ref.keys() and len(g) == len(list(ref.parameters()))
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **TOL[torch.float32], msg=lambda m: f"{k}: {m}")
    assert out.logits is None  # patch_causal_lm: training with labels returns no logits
    assert backend.LAST["ctx"].stats["pre_grad"]["fuse_linear_cross_entropy"]["fused"] == 1
    vocab, tokens = ref.config.vocab_size, ids.numel()
    for stage in ("joint", "forward", "backward"):
        assert _full_logit_nodes(backend.LAST[stage], tokens, vocab) == [], stage
    FileCheck().check("torch.ops.unsloth_fx.linear_cross_entropy.default").check_not("aten.nll_loss").run(
        backend.LAST["forward"].code)


def test_negative_control_unpatched_model_keeps_logits_and_the_golden_check_sees_them():
    torch._dynamo.reset()
    ref, _, ids, labels = _pair("tiny-qwen2")
    torch.compile(ref, backend="unsloth", options={"lower": "eager", "pipeline": PIPE})(
        input_ids=ids, labels=labels).loss.backward()
    stats = backend.LAST["ctx"].stats["pre_grad"]["fuse_linear_cross_entropy"]
    assert stats["fused"] == 0 and "patch_causal_lm" in stats["skipped"][0]
    assert _full_logit_nodes(backend.LAST["forward"], ids.numel(), ref.config.vocab_size)
    assert _full_logit_nodes(backend.LAST["backward"], ids.numel(), ref.config.vocab_size)


def test_bf16_training_step_matches_hf():
    torch._dynamo.reset()
    ref, ours, ids, labels = _pair("tiny-qwen2", dtype=torch.bfloat16)
    out, g = _step(torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": PIPE}), ids, labels)
    ref_out, g_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-2, rtol=1e-2)
    for k in g_ref:
        torch.testing.assert_close(g[k].float(), g_ref[k].float(), atol=3e-2, rtol=5e-2, msg=lambda m: f"{k}: {m}")


def test_dynamic_sequence_lengths_recompile_once_and_stay_exact():
    torch._dynamo.reset()
    ref, ours, _, _ = _pair("tiny-llama")
    compiled = torch.compile(ours, backend="unsloth", dynamic=True, options={"lower": "eager", "pipeline": PIPE})
    for seq in (11, 6, 2):  # 2 tokens of which one predicts: fewer tokens than chunks
        ids = torch.randint(0, ref.config.vocab_size, (1, seq))
        out, g = _step(compiled, ids, ids)
        ref_out, g_ref = _step(ref, ids, ids)
        torch.testing.assert_close(out.loss, ref_out.loss, **TOL[torch.float32])
        torch.testing.assert_close(g["lm_head.weight"], g_ref["lm_head.weight"], **TOL[torch.float32])
        torch.testing.assert_close(g["model.embed_tokens.weight"], g_ref["model.embed_tokens.weight"],
                                   **TOL[torch.float32])


def _dynamo_graph(model, ids, labels):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture)(input_ids=ids, labels=labels)
    return graphs[0]


def test_pass_is_idempotent_and_reports_what_it_did():
    _, ours, ids, labels = _pair("tiny-qwen2")
    gm, inputs = _dynamo_graph(ours, ids, labels)
    spec = get_pass("fuse_linear_cross_entropy")
    ctx = PassContext(options=Options(), stage="pre_grad", example_inputs=inputs)
    first = spec.run(gm, ctx, chunks=5)
    assert first.modified and first.stats["fused"] == 1 and first.stats["chunks"] == 5
    (op,) = [n for n in first.graph_module.graph.nodes if n.target is OP]
    # the pass's default is the op's memory-saving mode (no vocab x hidden fp32 accumulator)
    assert op.args[3:] == (-100, 5, 0, "mean", True, "weight_dtype")
    assert first.stats["grad_weight_accum"] == "weight_dtype" == ufx(op).notes["grad_weight_accum"]
    assert ufx(op).decision == "chunk" and ufx(op).region == "lm_head_ce_0"
    assert [u.target for u in op.users] == [operator.getitem]
    assert not any(n.target is F.cross_entropy for n in first.graph_module.graph.nodes)
    second = spec.run(first.graph_module, ctx, chunks=5)
    assert not second.modified and second.stats["fused"] == 0


def test_pass_rejects_bad_options():
    _, ours, ids, labels = _pair("tiny-qwen2")
    gm, inputs = _dynamo_graph(ours, ids, labels)
    with pytest.raises(ValueError, match="chunks=0 must be >= 1"):
        get_pass("fuse_linear_cross_entropy").run(gm, PassContext(options=Options(), stage="pre_grad"), chunks=0)
    with pytest.raises(ValueError, match=r"grad_weight_accum='bf16' is not one of \('fp32', 'weight_dtype'\)"):
        get_pass("fuse_linear_cross_entropy").run(gm, PassContext(options=Options(), stage="pre_grad"),
                                                  grad_weight_accum="bf16")


def test_pass_option_grad_weight_accum_fp32_reaches_the_op():
    _, ours, ids, labels = _pair("tiny-qwen2")
    gm, inputs = _dynamo_graph(ours, ids, labels)
    res = get_pass("fuse_linear_cross_entropy").run(gm, PassContext(options=Options(), stage="pre_grad"),
                                                    chunks=2, grad_weight_accum="fp32")
    (op,) = [n for n in res.graph_module.graph.nodes if n.target is OP]
    assert op.args[8] == "fp32" and res.stats["grad_weight_accum"] == "fp32"


# --- chunks="auto" -----------------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self, hidden=8, vocab=50, dtype=torch.float32):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)

    def forward(self, h, y):
        return F.cross_entropy(self.lm_head(h).float().view(-1, self.lm_head.out_features), y.view(-1))


@pytest.mark.parametrize("dtype,budget,k", [
    (torch.float32, 4_800, 4),    # 50 x 4 B = 200 B/token; limit 600 -> 3 tokens/chunk -> ceil(12/3) = 4
    (torch.float32, 2_000, 12),   # limit 250 -> 1 token/chunk -> 12 (the token count, the cap)
    (torch.float32, 1_000, 12),   # limit 125: not even one token fits -> the maximum, with a note
    (torch.bfloat16, 4_800, 6),   # bf16 product + fp32 copy: 50 x 6 B = 300 B/token; 2 tokens/chunk -> 6
    (torch.float32, 20_000, 1),   # limit 2500 >= 12 x 200 = 2400: everything fits in one chunk
])
def test_auto_chunk_count_for_the_lm_head_from_the_logits_bytes(dtype, budget, k):
    # hidden [2, 6, 8] -> 12 tokens, vocab 50; no parameters in the context: headroom = budget, limit = budget/8.
    m = _Head(dtype=dtype)
    h, y = torch.randn(2, 6, 8, dtype=dtype), torch.randint(0, 50, (2, 6))
    gm, inputs = _dynamo_graph_of(m, h, y)
    ctx = PassContext(options=Options(memory_budget=budget), stage="pre_grad", example_inputs=inputs)
    res = get_pass("fuse_linear_cross_entropy").run(gm, ctx, chunks="auto")
    assert res.stats["fused"] == 1 and res.stats["chunks"] == k and res.stats["chunks_per_region"] == {"lm_head_ce_0": k}
    info = res.stats["auto"]["lm_head_ce_0"]
    assert (info["units"], info["bytes_per_unit"], info["limit"]) == (12, 50 * (4 if dtype == torch.float32 else 6),
                                                                         budget // 8)
    assert ("note" in info) == (budget == 1_000)
    (op,) = [n for n in gm.graph.nodes if n.target is OP]
    assert op.args[4] == k and ufx(op).notes["chunks"] == k


def _dynamo_graph_of(model, *args):
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward)(*args)
    return graphs[0]


def test_auto_lm_head_through_the_backend_matches_eager_and_needs_a_budget():
    m = _Head()
    h, y = torch.randn(2, 6, 8, requires_grad=True), torch.randint(0, 50, (2, 6))
    y[0, :3] = -100
    # Static: 400 fp32 weights = 1600 B + 1600 B gradient + 3200 B AdamW = 6400 B; + 4800 -> limit 600 -> 4.
    torch._dynamo.reset()
    out = torch.compile(m, backend="unsloth", options={
        "lower": "eager", "pipeline": "fuse_linear_cross_entropy{chunks=auto}", "memory_budget": 6400 + 4800})(h, y)
    stats = backend.LAST["ctx"].stats["pre_grad"]["fuse_linear_cross_entropy"]
    assert stats["chunks"] == 4 and stats["auto"]["lm_head_ce_0"]["static_bytes"] == 6400
    ref = m(h, y)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(out, (h, m.lm_head.weight)), torch.autograd.grad(ref, (h, m.lm_head.weight))):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="chunks='auto' needs a memory_budget"):
        torch.compile(m, backend="unsloth", options={"lower": "eager",
                                                     "pipeline": "fuse_linear_cross_entropy{chunks=auto}"})(h, y)
