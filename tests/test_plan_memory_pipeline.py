"""`plan_memory` credits only what the compile's pipeline runs after it.

Specification: the Static that plan_memory builds (``ctx.shared["memory_static"]``, and its flags in
the pass's stats) has

- ``fuse_group_bytes`` = the pipeline's ``fuse_optimizer{group_bytes=N}`` (the pass's default when
  not given), so the gradients a fused group keeps waiting are the pass's groups; ``fuse_optimizer``
  only when ``fuse_optimizer=True`` *and* the pipeline has the ``fuse_optimizer`` pass;
- ``inplace_grad_scale`` only when the pipeline has the ``inplace_saved_grad_scale`` backward pass;

and the predicted peak moves with them: one update per gradient (``group_bytes=0``) peaks lower than
the default group, and the fused LM head's out-of-place gradient scale (no pass) peaks higher.
"""

from types import SimpleNamespace

import pytest
import torch

import unsloth_fx.backend as backend
from unsloth_fx import fusion
from unsloth_fx.memory import model as M
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.passes.fuse_optimizer import DEFAULT_GROUP_BYTES
from unsloth_fx.passes.plan_memory import _pipeline_credits
from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm
from unsloth_fx.zoo import build_model

SEQ = 8
LCE = "fuse_linear_cross_entropy{chunks=2}"


def _compile_step(pipeline, *, fused=False, lce=False, vocab=512, freeze_embedding=False):
    """One eager-lowered training step of a 1-layer tiny-qwen2; returns (plan_memory stats, Static, model)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = build_model("tiny-qwen2", device="cpu", dtype=torch.float32, num_hidden_layers=1, vocab_size=vocab)
    if lce:
        m = patch_causal_lm(m)
    m.config.use_cache = False
    if freeze_embedding:
        m.model.embed_tokens.weight.requires_grad_(False)
    if fused:
        opt = HybridAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, state_precision="fp32",
                          implementation="reference")
        fusion.attach(m, opt)
    ids = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(1))
    c = torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": pipeline, "fuse_optimizer": fused})
    c(input_ids=ids, labels=ids).loss.backward()
    ctx = backend.LAST["ctx"]
    return ctx.stats["joint"]["plan_memory"], ctx.shared["memory_static"], m


def test_fused_groups_use_the_pipelines_group_bytes():
    st_default, s_default, _ = _compile_step("plan_memory,fuse_optimizer", fused=True)
    st_zero, s_zero, m = _compile_step("plan_memory,fuse_optimizer{group_bytes=0}", fused=True)
    # the pass really ran with those groups: one call per parameter
    assert backend.LAST["ctx"].stats["joint"]["fuse_optimizer"]["group_bytes"] == 0
    assert backend.LAST["ctx"].stats["joint"]["fuse_optimizer"]["update_calls"] == len(list(m.parameters()))
    assert s_default.fuse_optimizer and s_zero.fuse_optimizer
    assert s_default.fuse_group_bytes == DEFAULT_GROUP_BYTES and st_default["fuse_group_bytes"] == DEFAULT_GROUP_BYTES
    assert s_zero.fuse_group_bytes == 0 and st_zero["fuse_group_bytes"] == 0
    # the default group (64 MiB) holds every gradient of the tiny model until its one update; with
    # group_bytes=0 each gradient waits only for its own update
    grads = sum(M.round_block(p.numel() * p.element_size()) for p in m.parameters())
    biggest = max(M.round_block(p.numel() * p.element_size()) for p in m.parameters())
    assert s_default.optimizer_temp >= grads and s_zero.optimizer_temp < grads
    assert s_zero.optimizer_temp >= biggest
    assert st_zero["predicted_peak"] < st_default["predicted_peak"], (st_zero["predicted_peak"],
                                                                       st_default["predicted_peak"])


def test_group_bytes_larger_than_the_default_is_recorded():
    big = 1 << 40
    st, s, _ = _compile_step(f"plan_memory,fuse_optimizer{{group_bytes={big}}}", fused=True)
    assert s.fuse_group_bytes == big and st["fuse_group_bytes"] == big
    assert any(f"groups of up to {big} B" in a for a in s.assumptions)


def test_fuse_optimizer_option_without_the_pass_is_not_credited():
    st_fused, s_fused, _ = _compile_step("plan_memory,fuse_optimizer", fused=True)
    st, s, m = _compile_step("plan_memory", fused=True)
    assert all(p.grad is not None for p in m.parameters())  # nothing fused: gradients kept
    assert s.fuse_optimizer is False and s.fuse_group_bytes is None and st["fuse_optimizer"] is False
    assert s.gradients == sum(M.round_block(p.numel() * p.element_size()) for p in m.parameters())
    # unfused, every gradient is alive through the optimizer step
    assert st["predicted_peak"] > st_fused["predicted_peak"]


def test_inplace_grad_scale_follows_the_pipeline():
    # sgd (no state) and a frozen embedding put the peak at the start of backward, where the
    # out-of-place scale holds a second vocab x hidden copy of the LM head's gradient
    kw = dict(lce=True, vocab=2048, freeze_embedding=True)
    on, s_on, m = _compile_step(f"plan_memory{{optimizer=sgd}},{LCE},inplace_saved_grad_scale", **kw)
    assert backend.LAST["ctx"].stats["backward"]["inplace_saved_grad_scale"]["rewritten"] == 2
    off, s_off, _ = _compile_step(f"plan_memory{{optimizer=sgd}},{LCE}", **kw)
    assert "inplace_saved_grad_scale" not in backend.LAST["ctx"].stats["backward"]
    assert s_on.inplace_grad_scale is True and on["inplace_grad_scale"] is True
    assert s_off.inplace_grad_scale is False and off["inplace_grad_scale"] is False
    V, H = m.lm_head.weight.shape
    copy_bytes = M.round_block(V * H * 4) + M.round_block(SEQ * H * 4)  # grad_weight + grad_hidden, fp32
    assert 0 < off["predicted_peak"] - on["predicted_peak"] <= copy_bytes, (on["predicted_peak"],
                                                                            off["predicted_peak"])


@pytest.mark.parametrize("pipeline, fuse_option, expected", [
    ("default", True, (True, DEFAULT_GROUP_BYTES, True)),
    ("default", False, (False, None, True)),
    ("default,-inplace_saved_grad_scale", True, (True, DEFAULT_GROUP_BYTES, False)),
    ("default,fuse_optimizer{group_bytes=4096}", True, (True, 4096, True)),  # naming it again sets options
    ("default,-fuse_optimizer", True, (False, None, True)),
    ("plan_memory,fuse_optimizer{group_bytes=0}", True, (True, 0, False)),
])
def test_pipeline_credits_from_the_pipeline_string(pipeline, fuse_option, expected):
    ctx = SimpleNamespace(options=SimpleNamespace(pipeline=pipeline, fuse_optimizer=fuse_option))
    assert _pipeline_credits(ctx) == expected


def test_the_default_pipeline_plans_the_running_sums_chunk_recompute_writes():
    # chunk_recompute turns each weight's per-chunk gradient partials into a running sum (addmm); before it,
    # Inductor would inline autograd's add chain and keep every chunk's partial alive, and the planner models
    # that. So plan_memory must run after chunk_recompute: in the opposite order an H100 compile of the 7B
    # was refused at 24 GiB (minimum activations 4.24 GiB) where the graph that runs needs 23.87 GiB
    from unsloth_fx.pipeline import DEFAULT_PASSES

    assert DEFAULT_PASSES.index("chunk_recompute") < DEFAULT_PASSES.index("plan_memory")

    def peak(pipeline):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = build_model("tiny-qwen2", device="cpu", dtype=torch.float32, num_hidden_layers=1, hidden_size=256,
                        intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2)
        m.config.use_cache = False
        ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(1))
        c = torch.compile(m, backend="unsloth", options={"lower": "inductor", "pipeline": pipeline})
        c(input_ids=ids, labels=ids).loss.backward()
        st = backend.LAST["ctx"].stats["joint"]
        assert st["chunk_recompute"]["accumulated"] == {"addmm": 3}  # gate, up and down: one running sum each
        return list(st), st["plan_memory"]["predicted_peak"]

    order, new = peak("default,+split_token_chunks{chunks=4}")
    assert order.index("chunk_recompute") < order.index("plan_memory"), order
    _, old = peak("share_weights,plan_memory,chunk_recompute,split_token_chunks{chunks=4}")
    partial = 2048 * 256 * 4  # one fp32 partial of one MLP weight
    assert old - new >= 2 * partial, (old, new)  # the add chain's extra partials are gone from the plan
