"""unsloth_fx.memory.whole (the CLI planner): the traced step keeps the cross-entropy backward, and
lower="inductor" (the CLI's default) is traced and planned as plan_memory does."""

import torch

from unsloth_fx.memory import whole
from unsloth_fx.zoo import build_model

SEQ = 64


def _targets(joint):
    return {str(n.target) for n in joint.graph.nodes if n.op == "call_function"}


def _logits_numel():
    m = build_model("tiny-qwen2", device="meta")
    return SEQ * m.config.vocab_size


def test_unchunked_trace_keeps_the_cross_entropy_backward():
    # the unchunked trace runs on fake CPU tensors (not meta, where aten::nll_loss has no autograd kernel)
    tr = whole.trace_step(build_model("tiny-qwen2", device="meta"), 1, SEQ, torch.bfloat16, None)
    assert "aten.nll_loss_backward.default" in _targets(tr.joint)
    assert "aten._log_softmax_backward_data.default" in _targets(tr.joint)
    # the gradient of the (fp32-upcast) logits is produced in backward
    grads = [n for n in tr.joint.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.nll_loss_backward.default]
    assert grads[0].meta["val"].numel() == _logits_numel()


def test_inductor_lowering_traces_decomposed_and_plans_fused():
    tr = whole.trace_step(build_model("tiny-qwen2", device="meta"), 1, SEQ, torch.bfloat16, None, lower="inductor")
    t = _targets(tr.joint)
    assert "aten.nll_loss_backward.default" not in t  # Inductor's decompositions: scatter upon full
    assert "aten.scatter.value" in t
    ind = whole.estimate("tiny-qwen2", seq=SEQ, optimizer="adamw-bf16", lower="inductor")
    eag = whole.estimate("tiny-qwen2", seq=SEQ, optimizer="adamw-bf16", lower="eager")
    assert ind.static.lower == "inductor" and eag.static.lower == "eager"
    assert any("inductor_inlined" in a for a in ind.assumptions)
    # the fp32 [seq, vocab] cross-entropy chain is not materialized under Inductor
    assert ind.activations < eag.activations
    # but the CE backward is still there: the backward peak holds at least the bf16 logits gradient
    bw = max(e.live_bytes for e in ind.timeline.events if e.phase == "backward")
    assert bw - ind.static.resident >= 2 * _logits_numel()


def test_chunked_trace_with_inductor_lowering():
    tr = whole.trace_step(build_model("tiny-qwen2", device="meta"), 1, SEQ, torch.bfloat16, 2, lower="inductor")
    assert tr.chunking.get("lm_head_ce") == 2 and not tr.notes
    assert "unsloth_fx.linear_cross_entropy.default" in _targets(tr.joint)


def test_the_floor_counts_an_op_workspace_at_the_peak():
    # an op's workspace is no event of the timeline, only a bump at its node: the activation peak must count it
    from unsloth_fx.memory import model as M
    from unsloth_fx.memory.whole import _noopt_peak

    st = M.Static(parameters=1000)
    tl = M.Timeline(static=st, events=[M.Event(0, "forward", "a", "alloc", 100, 1100, "saved"),
                                        M.Event(1, "backward", "a", "free", 100, 1000, "saved")],
                    peak=1600, peak_phase="backward", peak_node="lce", peak_by_category={"workspace": 500})
    assert _noopt_peak(tl) == 1600
    tl.peak_phase = "optimizer"  # the optimizer step's temporaries are counted elsewhere (opt_peak)
    assert _noopt_peak(tl) == 1100
