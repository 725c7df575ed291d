"""Chunked recompute regions: ``split_token_chunks`` (pre_grad) splits gated MLPs into
token chunks, ``chunk_recompute`` (joint) tags each chunk's forward intermediates
MUST_RECOMPUTE. Specification: same loss and gradients as unchunked; the
forward saves no chunk intermediate; in the backward graph chunk k's recomputed
activations die before chunk k+1's are made."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import unsloth_fx.backend as backend
from unsloth_fx.options import Options
from unsloth_fx.pass_base import PassContext, get_pass
from unsloth_fx.passes.chunk_recompute import chunk_order_violations
from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm
from unsloth_fx.zoo import build_model

PIPE = "default,+split_token_chunks{chunks=3},+fuse_linear_cross_entropy{chunks=3}"
TOL = dict(atol=2e-5, rtol=2e-4)


def _pair(name, seq=13):
    torch.manual_seed(0)
    ref = build_model(name, device="cpu", dtype=torch.float32)
    ours = build_model(name, device="cpu", dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    ref.config.use_cache = ours.config.use_cache = False
    ref.train(), ours.train()
    return ref, patch_causal_lm(ours), torch.randint(0, ref.config.vocab_size, (2, seq))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    plain = getattr(model, "_orig_mod", model)
    return out.loss.detach(), {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}


def _saved_chunk_intermediates(fw):
    """Forward-graph outputs (saved for backward) that are a chunk's forward intermediates."""
    (out,) = [n for n in fw.graph.nodes if n.op == "output"]
    return [a.name for a in out.args[0] if isinstance(a, torch.fx.Node) and getattr(
        a.meta.get("ufx"), "decision", None) == "chunk"]


@pytest.mark.parametrize("name,regions", [("tiny-qwen2", 2), ("tiny-llama", 2), ("tiny-deepseek-v3", 2)])
def test_chunked_training_step_matches_hf_and_recomputes_chunk_by_chunk(name, regions):
    torch._dynamo.reset()
    ref, ours, ids = _pair(name)
    loss, g = _step(torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": PIPE}), ids)
    loss_ref, g_ref = _step(ref, ids)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert g.keys() == g_ref.keys() and len(g) == len(list(ref.parameters()))
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **TOL, msg=lambda m: f"{k}: {m}")
    stats = backend.LAST["ctx"].stats
    # tiny-deepseek-v3: the layer-0 dense MLP and the layer-1 shared expert; routed experts are not matched.
    assert stats["pre_grad"]["split_token_chunks"]["regions"] == regions
    assert set(stats["joint"]["chunk_recompute"]["chunks_per_region"].values()) == {3}
    assert _saved_chunk_intermediates(backend.LAST["forward"]) == []
    assert chunk_order_violations(backend.LAST["backward"]) == []
    # Negative control: in the joint graph every chunk's forward precedes every backward, so the checker fires.
    assert len(chunk_order_violations(backend.LAST["joint"])) == 2 * regions


class GatedMLP(torch.nn.Module):
    def __init__(self, hidden, inter, act):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x + self.down(self.act(self.gate(h)) * self.up(h))).square().mean()


@settings(max_examples=8, deadline=None)
@given(seq=st.integers(1, 11), batch=st.integers(1, 2), chunks=st.integers(2, 6),
       hidden=st.sampled_from([4, 8]), act=st.sampled_from([F.silu, F.gelu]))
def test_property_any_gated_mlp_chunking_matches_eager(seq, batch, chunks, hidden, act):
    # seq < chunks gives empty chunks: still exact.
    torch._dynamo.reset()
    torch.manual_seed(seq)
    m = GatedMLP(hidden, 2 * hidden, act)
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    pipe = f"default,+split_token_chunks{{chunks={chunks}}}"
    out = torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": pipe})(x)
    got = torch.autograd.grad(out, [x, *m.parameters()])
    ref = m(x)
    want = torch.autograd.grad(ref, [x, *m.parameters()])
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert backend.LAST["ctx"].stats["pre_grad"]["split_token_chunks"]["regions"] == 1
    assert chunk_order_violations(backend.LAST["backward"]) == []


def test_passes_are_idempotent():
    _, ours, ids = _pair("tiny-llama")
    graphs = []
    torch._dynamo.reset()
    torch.compile(ours, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(input_ids=ids, labels=ids)
    ctx = PassContext(options=Options(), stage="pre_grad")
    split = get_pass("split_token_chunks")
    first = split.run(graphs[0], ctx, chunks=4)
    assert first.modified and first.stats == {"regions": 2, "chunks": 4}
    assert not split.run(first.graph_module, ctx, chunks=4).modified

    torch._dynamo.reset()
    ours.zero_grad()
    torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": PIPE})(
        input_ids=ids, labels=ids).loss.backward()
    again = get_pass("chunk_recompute").run(backend.LAST["joint"], backend.LAST["ctx"])
    assert not again.modified and again.stats["tagged"] == 0 and again.stats["regions"] == 2


def test_bad_chunk_count_is_rejected():
    with pytest.raises(ValueError, match="chunks=0 must be >= 1"):
        get_pass("split_token_chunks").run(torch.fx.symbolic_trace(torch.nn.Identity()),
                                           PassContext(options=Options()), chunks=0)
