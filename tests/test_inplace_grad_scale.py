"""The ``inplace_saved_grad_scale`` backward pass and the memory model's matching credit.

Specification: with the pass, the fused LM head's saved ``grad_hidden`` / ``grad_weight`` are
scaled in place by the loss gradient (``unsloth_fx.scale_``); loss and every gradient are
bit-identical to the run without the pass (fp32, bf16, a loss scaled by 0.5 so the scale is not 1);
the backward graph keeps no out-of-place scale of a saved gradient; the pass is idempotent; a second
backward through the same graph raises; the memory model allocates nothing for the scale.
"""

import pytest
import torch
from torch.testing import FileCheck

import unsloth_fx.backend as backend
from unsloth_fx.memory import model as M
from unsloth_fx.pass_base import get_pass
from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm
from unsloth_fx.zoo import build_model

WITH = "default,+fuse_linear_cross_entropy{chunks=3}"
WITHOUT = "default,-inplace_saved_grad_scale,+fuse_linear_cross_entropy{chunks=3}"


def _model(dtype):
    torch.manual_seed(0)
    m = patch_causal_lm(build_model("tiny-qwen2", device="cpu", dtype=dtype))
    m.config.use_cache = False
    m.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m.config.vocab_size, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return m, ids, labels


def _run(pipeline, dtype=torch.float32, lower="eager", scale=0.5):
    torch._dynamo.reset()
    m, ids, labels = _model(dtype)
    c = torch.compile(m, backend="unsloth", options={"lower": lower, "pipeline": pipeline})
    loss = c(input_ids=ids, labels=labels).loss
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, m


def _assert_identical(a, b):
    (la, ga, _), (lb, gb, m) = a, b
    assert torch.equal(la, lb), (la, lb)
    assert ga.keys() == gb.keys() and len(ga) == len(list(m.parameters()))
    for k in ga:
        assert ga[k] is not None and torch.equal(ga[k], gb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_identical_with_and_without_the_pass(dtype):
    off = _run(WITHOUT, dtype)
    assert backend.LAST["ctx"].stats["backward"].get("inplace_saved_grad_scale") is None
    on = _run(WITH, dtype)
    st = backend.LAST["ctx"].stats["backward"]["inplace_saved_grad_scale"]
    assert st["rewritten"] == 2 and st["modified"] is True  # grad_hidden and grad_weight
    m = on[2]
    V, H = m.lm_head.weight.shape
    item = m.lm_head.weight.element_size()
    assert st["bytes_not_copied"] == (V * H + 2 * 13 * H) * item
    _assert_identical(off, on)
    # the scale really is 0.5 (not skipped as 1): the LM head gradient halves with the loss
    full = _run(WITH, dtype, scale=1.0)
    assert torch.equal(full[1]["lm_head.weight"] * 0.5, on[1]["lm_head.weight"])


def test_golden_backward_has_no_out_of_place_scale_of_the_saved_gradients():
    _run(WITH)
    bw = backend.LAST["backward"]
    FileCheck().check_count("torch.ops.unsloth_fx.scale_.default", 2, exactly=True).check_not(
        "lce_grad_scale").run(bw.code)
    scales = [n for n in bw.graph.nodes if n.target == torch.ops.unsloth_fx.scale_.default]
    saved = [n.args[0] for n in scales]
    assert all(x.op == "placeholder" for x in saved)
    # the saved grad_weight itself is the lm_head gradient backward returns (no second buffer)
    out = next(n for n in bw.graph.nodes if n.op == "output").args[0]
    assert any(a in saved for a in out if isinstance(a, torch.fx.Node))
    for x in saved:  # nothing reads the saved tensor before it is scaled
        first = min(x.users, key=lambda u: list(bw.graph.nodes).index(u))
        assert first.target == torch.ops.unsloth_fx.scale_.default
    # without the pass the traced backward scales out of place
    _run(WITHOUT)
    FileCheck().check_count("torch.ops.unsloth_fx.lce_grad_scale.default", 2, exactly=True).check_not(
        "unsloth_fx.scale_").run(backend.LAST["backward"].code)


def test_pass_is_idempotent():
    _run(WITH)
    bw, ctx = backend.LAST["backward"], backend.LAST["ctx"]
    before = bw.code
    res = get_pass("inplace_saved_grad_scale").run(bw, ctx)
    assert res.modified is False and res.stats["rewritten"] == 0
    assert res.graph_module.code == before


def test_second_backward_through_the_same_graph_raises():
    torch._dynamo.reset()
    m, ids, labels = _model(torch.float32)
    c = torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": WITH})
    loss = c(input_ids=ids, labels=labels).loss * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_memory_model_allocates_nothing_for_the_scale():
    _run(WITH)
    joint, ctx = backend.LAST["joint"], backend.LAST["ctx"]
    st = M.static_from_graph(joint, "adamw", False, ctx.params)
    on = M.predict(joint, ctx.num_fwd_outputs, st)
    off = M.predict(joint, ctx.num_fwd_outputs, M.copy_static(st, inplace_grad_scale=False))
    scale_allocs = [e for e in off.events if e.kind == "alloc" and e.node.startswith("lce_grad_scale")]
    assert len(scale_allocs) == 2
    assert not [e for e in on.events if e.kind == "alloc" and e.node.startswith("lce_grad_scale")]
    w = next(n for n in joint.graph.nodes if n.op == "call_function"
             and str(n.target) == "unsloth_fx.linear_cross_entropy.default").args[1].meta["val"]
    wbytes = M.round_block(w.numel() * w.element_size())
    assert wbytes in [e.bytes for e in scale_allocs]
    # the gradient is still counted through the optimizer step: same bytes alive at the end
    assert on.events[-1].live_bytes == off.events[-1].live_bytes
    assert off.peak - on.peak >= 0
    assert sum(e.bytes for e in on.events if e.kind == "alloc") == \
        sum(e.bytes for e in off.events if e.kind == "alloc") - sum(e.bytes for e in scale_allocs)


@pytest.mark.slow
def test_inductor_lowering_scales_in_place_and_matches():
    off = _run(WITHOUT, lower="inductor")
    on = _run(WITH, lower="inductor")
    assert backend.LAST["ctx"].stats["backward"]["inplace_saved_grad_scale"]["rewritten"] == 2
    _assert_identical(off, on)


def _planned_backward(joint, nfwd):
    from unsloth_fx.memory import schedule as S

    dec = S.solve(joint, nfwd, 2**62, S.DeviceModel(offload=False), force_recompute=True)
    g = torch.fx.GraphModule(joint, joint.graph)
    S._tag(g, dec)
    return dec, M.partition(g, nfwd)[1]


def _scales(bw):
    return [n for n in bw.graph.nodes if str(n.target) == "unsloth_fx.lce_grad_scale.default"]


@pytest.mark.parametrize("source", ["backend", "planner_trace"])
def test_a_planned_graph_is_scaled_in_place_through_the_partitioners_views(source):
    # With save/recompute tags on the joint graph (what plan_memory leaves), the partitioner re-derives
    # identity views of the saved gradients in the backward: lce_grad_scale reads detach(detach(saved))
    # (the backend's eager lowering) or alias(alias(saved)) (the planner's trace of the product path).
    # The pass and the memory model must see through them (before: a second vocab x hidden buffer, 1 GiB
    # on R1-Distill-Qwen-7B, in every planned graph).
    from unsloth_fx.memory import schedule as S

    if source == "backend":
        _run(WITH)
        joint, ctx = backend.LAST["joint"], backend.LAST["ctx"]
        nfwd, rows = ctx.num_fwd_outputs, ctx.params
        st = M.static_from_graph(joint, "adamw", False, rows)
        view = "aten.detach.default"
    else:
        from unsloth_fx.memory.whole import _set_lower, trace_step

        tr = trace_step(build_model("tiny-qwen2", device="meta"), 1, 64, torch.bfloat16, 4, "inductor")
        joint, nfwd, ctx = tr.joint, tr.nfwd, backend.LAST["ctx"]
        st = _set_lower(M.static_breakdown(tr.rows, "int4/int4", True), "inductor")
        view = "aten.alias.default"
    dec, bw = _planned_backward(joint, nfwd)
    scales = _scales(bw)
    assert len(scales) == 2
    assert any(str(n.args[0].target) == view for n in scales)  # the case under test
    tl = S._predict_tagged(joint, nfwd, st, dec)
    assert not [e for e in tl.events if e.kind == "alloc" and e.node.startswith("lce_grad_scale")]
    res = get_pass("inplace_saved_grad_scale").run(bw, ctx)
    assert res.stats["rewritten"] == 2
    FileCheck().check_count("torch.ops.unsloth_fx.scale_.default", 2, exactly=True).check_not(
        "lce_grad_scale").run(res.graph_module.code)
    new = [n for n in res.graph_module.graph.nodes if n.target == torch.ops.unsloth_fx.scale_.default]
    # a saved tensor, or (where the plan recomputes the LM-head op) its recomputed output
    assert all(n.args[0].op == "placeholder" or str(n.args[0].args[0].target) == "unsloth_fx.linear_cross_entropy"
               ".default" for n in new)
    # the dead view chains are gone: nothing views the scaled inputs any more
    assert not [u for n in new for u in n.args[0].users if str(u.target) == view]


def test_a_recomputed_lm_head_op_is_scaled_in_place_too():
    # A plan may recompute the fused LM-head op in the backward (the fewest-bytes plans do): its outputs
    # are then fresh buffers of the backward graph, read only by the scale, and scaled in place like saved
    # ones (before: a recomputed vocab x hidden gradient plus its scaled copy, 2 GiB on R1-Distill-Qwen-7B).
    from unsloth_fx.memory import schedule as S
    from unsloth_fx.memory.whole import _set_lower, trace_step

    tr = trace_step(build_model("tiny-qwen2", device="meta"), 1, 64, torch.bfloat16, 4, "inductor")
    lce = next(n for n in tr.joint.graph.nodes if str(n.target) == "unsloth_fx.linear_cross_entropy.default")
    dec = {lce.name: "recompute", **{u.name: "recompute" for u in lce.users}}
    g = torch.fx.GraphModule(tr.joint, tr.joint.graph)
    S._tag(g, dec)
    _, bw = M.partition(g, tr.nfwd)
    assert any(str(n.target) == "unsloth_fx.linear_cross_entropy.default" for n in bw.graph.nodes)  # recomputed
    assert len(_scales(bw)) == 2
    st = _set_lower(M.static_breakdown(tr.rows, "int4/int4", True), "inductor")
    tl = S._predict_tagged(tr.joint, tr.nfwd, st, dec)
    assert not [e for e in tl.events if e.kind == "alloc" and e.node.startswith("lce_grad_scale")]
    res = get_pass("inplace_saved_grad_scale").run(bw, backend.LAST["ctx"] if backend.LAST.get("ctx") else None)
    assert res.stats["rewritten"] == 2
    new = [n for n in res.graph_module.graph.nodes if n.target == torch.ops.unsloth_fx.scale_.default]
    assert all(str(n.args[0].args[0].target) == "unsloth_fx.linear_cross_entropy.default" for n in new)
