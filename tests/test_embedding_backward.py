"""``torch.ops.unsloth_fx.embedding_dense_backward`` (runtime/embedding_backward.py) and its routing.

Specification: the op returns what ``aten.embedding_dense_backward``'s decomposition returns (fp32 sums,
one rounding to the gradient's dtype; padding rows and out-of-range ids contribute nothing;
``scale_grad_by_freq`` divides by the id's count) without any ``vocab x hidden`` fp32 buffer; the
backend's Inductor table (``backend.decompositions("inductor")``) and the planner's trace route the aten
op to it; the memory model sizes its ``[tokens, hidden]`` workspace.
"""

import pytest
import torch
from torch._decomp.decompositions import embedding_dense_backward as decomposed

import unsloth_fx.backend as backend
from unsloth_fx import _compat
from unsloth_fx.memory import model as M
from unsloth_fx.memory.trace import trace_function
from unsloth_fx.runtime import embedding_backward as eb
from unsloth_fx.zoo import build_model

from _support import PeakAllocations, loss_and_grads

OP = torch.ops.unsloth_fx.embedding_dense_backward.default
ATEN = torch.ops.aten.embedding_dense_backward.default


def _case(V, H, shape, dtype, seed=0, hot=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, hot or V, shape, generator=g)
    grad = torch.randn(*shape, H, generator=g).to(dtype)
    return grad, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx,scale", [(-1, False), (3, False), (-1, True), (3, True)])
@pytest.mark.parametrize("V,H,shape,hot", [(1000, 64, (4096,), 40), (37, 5, (3, 11), None), (300, 16, (2, 257), None)])
def test_matches_the_decomposition_within_one_rounding(dtype, padding_idx, scale, V, H, shape, hot):
    grad, idx = _case(V, H, shape, dtype, hot=hot)
    idx.view(-1)[::7] = 3  # padding_idx (when set) occurs often
    ours, ref = OP(grad, idx, V, padding_idx, scale), decomposed(grad, idx, V, padding_idx, scale)
    exact = decomposed(grad.double(), idx, V, padding_idx, scale)
    assert ours.dtype == dtype and ours.shape == (V, H)
    if padding_idx >= 0:
        assert not ours[padding_idx].any()
    # Both are fp32 sums rounded once to ``dtype``: each is within the fp32 summation bound
    # (n + 1) * eps32 * sum|g| of the fp64 sum, plus one rounding to ``dtype``; in bf16 the two differ
    # by at most one bf16 spacing (they round fp32 sums that differ only in summation order).
    ones = torch.ones_like(grad, dtype=torch.float64)
    count = decomposed(ones, idx, V, padding_idx, False)
    abs_sum = decomposed(grad.double().abs(), idx, V, padding_idx, scale)
    bound = (count + 1) * torch.finfo(torch.float32).eps * abs_sum + torch.finfo(dtype).eps * exact.abs()
    assert ((ours.double() - exact).abs() <= bound).all()
    assert ((ref.double() - exact).abs() <= bound).all()  # the bound holds for the reference too
    if dtype == torch.bfloat16:
        spacing = torch.finfo(dtype).eps * torch.maximum(ours.double().abs(), ref.double().abs())
        assert ((ours.double() - ref.double()).abs() <= spacing).all()


def test_ignores_out_of_range_ids_and_handles_no_tokens():
    grad, idx = _case(10, 4, (20,), torch.float32)
    idx[0], idx[1] = -5, 10  # the decomposition drops these (it masks ids outside [0, V))
    torch.testing.assert_close(OP(grad, idx, 10, -1, False), decomposed(grad, idx, 10, -1, False))
    empty = OP(torch.empty(0, 4), torch.empty(0, dtype=torch.long), 10, -1, False)
    assert empty.shape == (10, 4) and not empty.any()


def test_torch_cpu_kernel_is_the_wrong_reference_in_bf16():
    # Why the op exists on CPU too (the docstring's claim): torch's CPU kernel sums in bf16.
    grad, idx = _case(1000, 64, (8192,), torch.bfloat16, hot=50)
    exact = decomposed(grad.double(), idx, 1000, -1, False)
    err_aten = (ATEN(grad, idx, 1000, -1, False).double() - exact).abs().max().item()
    err_ours = (OP(grad, idx, 1000, -1, False).double() - exact).abs().max().item()
    assert err_aten > 4 * err_ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("V,H,T", [(5000, 64, 512), (100, 256, 512)])
def test_workspace_bytes_bounds_what_the_kernel_allocates(dtype, scale, V, H, T):
    grad, idx = _case(V, H, (T,), dtype)
    tr = PeakAllocations()
    with tr:
        out = eb._impl(grad, idx, V, -1, scale)
    beyond_output = tr.peak - -(-out.untyped_storage().nbytes() // 512) * 512
    predicted = eb.workspace_bytes(T, H, dtype, scale)
    # an upper bound, tight to the index buffers (measured 17 of the 32 bytes per token counted)
    assert beyond_output <= predicted <= beyond_output + 16 * T, (beyond_output, predicted)
    assert (V, H) not in tr.fp32_shapes or (dtype == torch.float32 and tr.fp32_shapes.count((V, H)) == 1)


def _joint(decompositions, V=300, H=16, T=24):
    w = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (2, T // 2))

    def f(w, ids):
        return torch.nn.functional.embedding(ids, w).float().square().sum()

    return trace_function(f, [w, ids], decompositions=decompositions)


def _fp32_vocab_nodes(joint, V, H):
    return [n.name for n in joint.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
            and n.meta["val"].dtype == torch.float32 and tuple(n.meta["val"].shape) == (V, H)
            and n.op == "call_function"]


def test_backend_table_routes_inductor_decomposition_to_the_op_and_leaves_eager_alone():
    table = backend.decompositions("inductor")
    assert table[ATEN] is eb.decompose_embedding_dense_backward
    assert ATEN in _compat.inductor_decompositions()  # the table it overrides does decompose the op
    assert backend.decompositions("eager") == {}
    assert eb.with_decomposition({}) == {}  # a table that keeps the aten op keeps it


def test_model_sizes_the_op_by_hand_for_an_fp32_gradient():
    V, H, T = 300, 16, 24
    joint, _ = _joint(_compat.inductor_decompositions(), V, H, T)  # trace_function applies the override
    (node,) = [n for n in joint.graph.nodes if n.target is OP]
    assert node.meta["val"].shape == (V, H) and not any(n.target is ATEN for n in joint.graph.nodes)
    # [T, H] fp32 partial sums only (an fp32 gradient needs no copy) + 32 B/token, in 512-byte blocks
    assert M._workspace(node) == -(-(T * H * 4 + T * 32) // 512) * 512 == 2560


def test_traced_backward_has_no_vocab_by_hidden_fp32_node():
    # Golden check, bf16 weight: with the routed op no node makes a [V, H] fp32 tensor; negative
    # control: Inductor's own decomposition (aot_trace_joint applies the table as given) does.
    V, H = 300, 16
    w = torch.randn(V, H, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, V, (2, 12))

    def f(w, ids):
        return torch.nn.functional.embedding(ids, w).float().square().sum()

    joint, _ = _compat.aot_trace_joint(f, [w, ids], _compat.inductor_decompositions())
    assert _fp32_vocab_nodes(joint, V, H)
    joint2, _ = trace_function(f, [w, ids], decompositions=_compat.inductor_decompositions())
    assert _fp32_vocab_nodes(joint2, V, H) == []
    (node,) = [n for n in joint2.graph.nodes if n.target is OP]
    assert node.meta["val"].dtype == torch.bfloat16
    # bf16 gradient: partial sums + its fp32 copy, 8 B per element, + 32 B/token
    assert M._workspace(node) == -(-(24 * 16 * 8 + 24 * 32) // 512) * 512 == 4096


def test_model_sizes_torch_cuda_kernel_workspace_for_the_aten_op():
    V, H, T = 300, 16, 24
    joint, _ = _joint({}, V, H, T)  # no table: the aten op stays (lower="eager")
    (node,) = [n for n in joint.graph.nodes if n.target is ATEN]
    # fp32 per-token partials (T x H x 4 = 1536 -> 1536) + six int64 [T] buffers (192 -> 512 each)
    assert M._workspace(node) == 1536 + 6 * 512


def _decomposed_backend(table):
    """AOTAutograd with ``table``, graphs run eagerly: the traced path without Inductor's codegen."""
    return _compat.aot_autograd(fw_compiler=lambda g, _i: _compat.make_boxed(g),
                                bw_compiler=lambda g, _i: _compat.make_boxed(g), decompositions=table)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-deepseek-v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_with_the_routed_op_matches_the_decomposed_path_and_eager(name, dtype):
    torch.manual_seed(0)
    models = [build_model(name, device="cpu", dtype=dtype) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    for m in models:
        m.config.use_cache = False
    ids = torch.randint(0, models[0].config.vocab_size, (2, 24))
    ids[0, :4] = 7  # repeated ids: the per-id sums matter
    torch._dynamo.reset()
    new = torch.compile(models[0], backend=_decomposed_backend(backend.decompositions("inductor")))
    l_new, g_new = loss_and_grads(new, ids)
    torch._dynamo.reset()
    old = torch.compile(models[1], backend=_decomposed_backend(_compat.inductor_decompositions()))
    l_old, g_old = loss_and_grads(old, ids)
    torch._dynamo.reset()
    l_eager, g_eager = loss_and_grads(models[2], ids)
    emb = "model.embed_tokens.weight"
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l_new, l_old, atol=0, rtol=0)  # the forward is untouched
    assert g_new.keys() == g_old.keys() == g_eager.keys() and emb in g_new
    for k in g_old:
        torch.testing.assert_close(g_new[k], g_old[k], **tol, msg=lambda m: f"{k} vs decomposed: {m}")
        torch.testing.assert_close(g_new[k], g_eager[k], **tol, msg=lambda m: f"{k} vs eager: {m}")
    # the embedding gradient: within one rounding of the decomposed path's
    d = (g_new[emb] - g_old[emb]).abs()
    assert (d <= torch.finfo(dtype).eps * g_old[emb].abs() + 1e-7).all()


@pytest.mark.slow
def test_inductor_lowers_the_op_as_an_extern_call_and_matches_eager():
    torch.manual_seed(0)
    ref, ours = build_model("tiny-qwen2", device="cpu"), build_model("tiny-qwen2", device="cpu")
    ours.load_state_dict(ref.state_dict())
    ref.config.use_cache = ours.config.use_cache = False
    ids = torch.randint(0, 512, (2, 24))
    torch._dynamo.reset()
    l_ours, g_ours = loss_and_grads(torch.compile(ours, backend="unsloth", options={"lower": "inductor"}), ids)
    l_ref, g_ref = loss_and_grads(ref, ids)
    assert any(n.target is OP for n in backend.LAST["backward"].graph.nodes)
    torch.testing.assert_close(l_ours, l_ref, atol=2e-5, rtol=2e-4)
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], atol=2e-5, rtol=2e-4, msg=lambda m: f"{k}: {m}")
