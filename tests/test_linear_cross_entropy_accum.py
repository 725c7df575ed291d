"""``grad_weight_accum`` of ``torch.ops.unsloth_fx.linear_cross_entropy`` (runtime/linear_cross_entropy.py).

Specification: ``"weight_dtype"`` sums the LM-head gradient in the weight dtype (``addmm_``) and never
allocates a ``vocab x hidden`` fp32 buffer; ``"fp32"`` keeps the fp32 accumulator. The loss and
``grad_hidden`` do not depend on the mode (bitwise); ``grad_weight`` differs by at most the extra
per-chunk rounding (bitwise equal for an fp32 weight). ``workspace_bytes`` bounds what the op
allocates, and the memory model charges exactly it at the op.
"""

import pytest
import torch

import unsloth_fx.backend as backend
from unsloth_fx.memory import model as M
from unsloth_fx.memory.trace import trace_function
from unsloth_fx.runtime import linear_cross_entropy as lce

from _support import PeakAllocations, loss_and_grads, twin_models

OP = torch.ops.unsloth_fx.linear_cross_entropy.default
MODES = ("fp32", "weight_dtype")


def _inputs(T, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    y[::7] = -100
    return h, w, y


def _rel(x, exact):
    return ((x.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modes_share_loss_and_grad_hidden_and_differ_in_grad_weight_by_rounding_only(dtype):
    T, H, V, chunks = 512, 32, 400, 8
    h, w, y = _inputs(T, H, V, dtype)
    f = OP(h, w, y, -100, chunks, 0, "mean", True, "fp32")
    b = OP(h, w, y, -100, chunks, 0, "mean", True, "weight_dtype")
    assert torch.equal(f[0], b[0]) and torch.equal(f[1], b[1])
    assert f[2].dtype == b[2].dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(f[2], b[2])  # an fp32 weight is summed in place in both modes
        return
    # fp64 reference of the same per-chunk gradient logits: sum over all tokens at once
    ex = OP(h.double(), w.double(), y, -100, chunks, 0, "mean", True, "fp32")[2]
    e_f, e_b = _rel(f[2], ex), _rel(b[2], ex)
    u = 2.0**-8  # bf16 unit roundoff (round to nearest: half a spacing)
    # measured here: fp32 mode ~0.6 u, weight_dtype ~1.0 u at 8 chunks (docstring: 4096 tokens, 8 chunks:
    # 0.60 u vs 0.90 u); the rounding per chunk grows the error, boundedly
    assert e_f < 1.0 * u and e_b < 2.0 * u and e_b > e_f, (e_f / u, e_b / u)


def test_unknown_mode_is_refused_with_the_choices():
    h, w, y = _inputs(8, 4, 10, torch.float32)
    with pytest.raises(ValueError, match=r"grad_weight_accum='bf16' is not one of \('fp32', 'weight_dtype'\)"):
        OP(h, w, y, -100, 2, 0, "mean", True, "bf16")


def _run(dtype, mode, T=256, H=64, V=1000, chunks=4):
    h, w, y = _inputs(T, H, V, dtype)
    tr = PeakAllocations()
    with torch.no_grad(), tr:
        out = lce._forward_impl(h, w, y, -100, chunks, 0, "mean", True, mode)
    del out
    return tr


@pytest.mark.parametrize("mode,fp32_vh", [("weight_dtype", 0), ("fp32", 1)])
def test_weight_dtype_mode_allocates_no_vocab_by_hidden_fp32_buffer(mode, fp32_vh):
    # fp32 mode is the negative control: the tracker does see its accumulator
    tr = _run(torch.bfloat16, mode)
    assert tr.fp32_shapes.count((1000, 64)) == fp32_vh, tr.fp32_shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,H,V,chunks", [(256, 64, 1000, 4), (256, 16, 3000, 8), (256, 128, 200, 2), (5, 8, 30, 8)])
def test_workspace_bytes_bounds_what_the_op_allocates(dtype, mode, T, H, V, chunks):
    tr = _run(dtype, mode, T, H, V, chunks)
    predicted = lce.workspace_bytes(T, V, H, dtype, chunks, 0, True, mode)
    # an upper bound, loose only in the [T] bookkeeping (5 x 8 B/token + 8 blocks counted)
    assert tr.peak <= predicted <= tr.peak + 16 * T + 4096, (tr.peak, predicted)


def test_workspace_bytes_by_hand():
    # T=64, V=500, H=8, bf16, one chunk: [T] bookkeeping 5 x 512 + 8 x 512 = 6656; grad_hidden 1024; chunk logits
    # 64000 (bf16) + 128000 (fp32) = 192000 -> 64000 + 128000 (already whole blocks);
    # weight_dtype: grad_weight 8000 -> 8192; fp32: accumulator 16000 -> 16384, and at the end
    # its bf16 cast 8192 (smaller than the chunk buffers, so the chunk term stays the max).
    assert lce.workspace_bytes(64, 500, 8, torch.bfloat16, 1, 0, True, "weight_dtype") == 6656 + 1024 + 8192 + 192000
    assert lce.workspace_bytes(64, 500, 8, torch.bfloat16, 1, 0, True, "fp32") == 6656 + 1024 + 16384 + 192000
    # the two modes differ by exactly the fp32 accumulator minus the bf16 gradient when the chunk dominates
    assert (lce.workspace_bytes(64, 500, 8, torch.bfloat16, 1, 0, True, "fp32")
            - lce.workspace_bytes(64, 500, 8, torch.bfloat16, 1, 0, True, "weight_dtype")) == 16384 - 8192


@pytest.mark.parametrize("mode", MODES)
def test_memory_model_charges_the_op_at_its_node_by_hand(mode):
    T, V, H = 64, 500, 8
    h = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (T,))

    def f(h, w, y):
        return OP(h, w, y, -100, 1, 0, "mean", True, mode)[0]

    joint, nfwd = trace_function(f, [h, w, y])
    (node,) = [n for n in joint.graph.nodes if n.target is OP]
    ws = 6656 + 1024 + (8192 if mode == "weight_dtype" else 16384) + 192000  # test_workspace_bytes_by_hand
    assert M._workspace(node) == ws
    st = M.Static(parameters=0, buffers=0, gradients=0, optimizer_state=0, optimizer_temp=0, inputs=0)
    tl = M.predict(joint, nfwd, st)
    # nothing is allocated before the op in forward: the peak is the op's own bytes, charged at it
    assert tl.peak_phase == "forward" and tl.peak_node == node.name
    assert tl.peak == ws and tl.peak_by_category["workspace"] == ws


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-deepseek-v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_training_step_in_each_mode_matches_hf(name, dtype, mode):
    from unsloth_fx.runtime.linear_cross_entropy import patch_causal_lm

    ref, ours = twin_models(name, dtype)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    patch_causal_lm(ours)
    torch._dynamo.reset()
    pipe = f"default,+fuse_linear_cross_entropy{{chunks=3,grad_weight_accum={mode}}}"
    out, g = loss_and_grads(torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": pipe}), ids)
    ref_out, g_ref = loss_and_grads(ref, ids)
    stats = backend.LAST["ctx"].stats["pre_grad"]["fuse_linear_cross_entropy"]
    assert stats["fused"] == 1 and stats["grad_weight_accum"] == mode
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=5e-2)
    torch.testing.assert_close(out.float(), ref_out.float(), **(tol if dtype == torch.float32 else
                                                                dict(atol=1e-2, rtol=1e-2)))
    assert g.keys() == g_ref.keys() and len(g) == len(list(ref.parameters()))
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **tol, msg=lambda m: f"{k}: {m}")
