"""Memory and work of ``torch.ops.unsloth_fx.linear_cross_entropy`` (runtime/linear_cross_entropy.py).

Measured on CPU with a TorchDispatchMode that sees every aten op and keeps weak references to every
freshly allocated tensor (weak references die with the C++ tensor, so tensors held only by autograd's
saved variables or by ``.grad`` count as alive). Sizes are picked so that only the LM-head weight
and its gradients have ``[vocab, hidden]`` shape, and only the per-chunk logits buffers have
``[chunk_tokens, vocab]`` shape.
"""

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from unsloth_fx.passes.fuse_linear_cross_entropy import logit_bytes
from unsloth_fx.runtime import linear_cross_entropy as lce

T, H, V = 24, 12, 50  # tokens, hidden, vocab; chunks of 6 tokens with chunks=4 (6 != H, 24 != V)


class Tracker(TorchDispatchMode):
    """Every op's name and the tensors it touches; after each op, the fresh allocations still alive.

    Liveness is tracked per storage (weak references to ``untyped_storage()``, which torch keeps
    alive exactly as long as the C++ storage): autograd saves an op's outputs as new tensor objects
    sharing the storage, and AccumulateGrad adopts a gradient through ``detach()``, so tensor
    objects would under-count."""

    def __init__(self):
        super().__init__()
        self.live: list[tuple[weakref.ref, tuple[int, ...], int]] = []  # (storage, shape at allocation, bytes)
        self.allocated: list[tuple[tuple[int, ...], int]] = []  # (shape, data_ptr) of every fresh allocation
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []
        self.max_vh = 0  # most [V, H] allocations alive at once (any dtype)
        self.at_max = ""
        self.chunk_bytes_peak = 0  # most bytes of [<=T, V] buffers alive at once

    def _alive(self):
        self.live = [e for e in self.live if e[0]() is not None]
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        in_ptrs = {a.untyped_storage().data_ptr() for a in ins}
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.ops.append((str(func), [tuple(t.shape) for t in ins + outs]))
        for o in outs:
            st = o.untyped_storage()
            if not o._is_view() and st.data_ptr() not in in_ptrs and st.nbytes():
                self.live.append((weakref.ref(st), tuple(o.shape), st.nbytes()))
                self.allocated.append((tuple(o.shape), st.data_ptr()))
        alive = self._alive()
        vh = sum(1 for _, shape, _ in alive if shape == (V, H))
        if vh > self.max_vh:
            self.max_vh, self.at_max = vh, str(func)
        chunk = sum(n for _, shape, n in alive if len(shape) == 2 and shape[1] == V and shape[0] <= T)
        self.chunk_bytes_peak = max(self.chunk_bytes_peak, chunk)
        return out


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[::5] = -100
    return h, w, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_backward_holds_one_vocab_by_hidden_gradient_and_scales_exactly(dtype, scale):
    h, w, y = _inputs(dtype)
    with torch.no_grad():  # the unscaled gradients the op computes in forward
        _, gh_ref, gw_ref = torch.ops.unsloth_fx.linear_cross_entropy.default(h, w, y, -100, 4, 0, "mean", True)
    tr = Tracker()
    with tr:  # forward too, so the saved gradients are tracked
        loss = lce.linear_cross_entropy(h, w, y, chunks=4)
        scaled = loss * scale if scale != 1.0 else loss  # grad_output = scale (Trainer / accumulation)
        scaled.backward()
    # Saved grad_weight, the returned gradient and AccumulateGrad's .grad must all be one tensor.
    assert tr.max_vh == 1, f"{tr.max_vh} [vocab, hidden] tensors alive at once (at {tr.at_max})"
    assert not [op for op, shapes in tr.ops if op.startswith("aten.zeros")], "zero tangents were materialized"
    s = torch.tensor(scale).to(dtype)
    # Exactly what the out-of-place ``saved * grad_output`` gave (x * 1 == x bitwise).
    assert torch.equal(w.grad, gw_ref * s) and torch.equal(h.grad, gh_ref * s)


def test_the_saved_gradient_becomes_dot_grad_without_a_copy():
    h, w, y = _inputs(torch.float32)
    tr = Tracker()
    with tr:
        loss = lce.linear_cross_entropy(h, w, y, chunks=4)
        (loss * 2).backward()
    (vh,) = [ptr for shape, ptr in tr.allocated if shape == (V, H)]  # the op's grad_weight output
    assert w.grad.untyped_storage().data_ptr() == vh  # AccumulateGrad adopted it (detach, no clone)
    assert torch.equal(w.grad, 2 * torch.ops.unsloth_fx.linear_cross_entropy.default(
        h.detach(), w.detach(), y, -100, 4, 0, "mean", True)[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retain_graph_second_backward_is_correct_at_scale_one_and_refused_otherwise(dtype):
    h, w, y = _inputs(dtype)
    loss = lce.linear_cross_entropy(h, w, y, chunks=3)
    loss.backward(retain_graph=True)
    g1 = (h.grad.clone(), w.grad.clone())
    loss.backward()  # grad_output 1 on CPU: saved gradients untouched, the second backward adds them again
    assert torch.equal(w.grad, g1[1] + g1[1]) and torch.equal(h.grad, g1[0] + g1[0])

    h.grad = w.grad = None
    loss = lce.linear_cross_entropy(h, w, y, chunks=3)
    (loss * 3).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice .*retain_graph=True.* scaled its saved gradients in place"):
        (loss * 3).backward()


def test_create_graph_keeps_the_out_of_place_formula():
    h, w, y = _inputs(torch.float32)
    loss = lce.linear_cross_entropy(h, w, y, chunks=2)
    gh, gw = torch.autograd.grad(loss * 2, (h, w), create_graph=True)
    gh2, gw2 = torch.autograd.grad(lce.linear_cross_entropy(h, w, y, chunks=2) * 2, (h, w))
    assert torch.equal(gh, gh2) and torch.equal(gw, gw2)


def _chunk_ops(dtype, chunks):
    h, w, y = _inputs(dtype)
    tr = Tracker()
    with torch.no_grad(), tr:
        lce._forward_impl(h.detach(), w.detach(), y, -100, chunks, 0, "mean", True)
    return tr


def _kernels(tr):
    """Ops that launch work (views and metadata-only ops excluded)."""
    views = ("aten.slice", "aten.unsqueeze", "aten.t.", "aten.view", "aten.squeeze", "aten.detach", "aten.expand",
             "aten._local_scalar_dense")
    return [(op, shapes) for op, shapes in tr.ops if not op.startswith(views)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_chunk_work_budget(dtype):
    # Per chunk (c = 6 tokens): ops touching a [c, V] buffer and fresh [c, V] bytes, from the
    # difference between 4 and 2 chunks of the same tokens (fixed work cancels).
    a, b = _chunk_ops(dtype, 2), _chunk_ops(dtype, 4)
    ka, kb = _kernels(a), _kernels(b)
    per_chunk = (len(kb) - len(ka)) // 2

    def chunk_sized(shapes):
        return any(s in ((6, V), (V, 6)) for s in shapes)

    big = [op for op, shapes in kb if chunk_sized(shapes)]
    assert per_chunk <= (18 if dtype == torch.float32 else 20), [op for op, _ in kb]
    # mm, amax, gather, sub(_), exp_, sum, scatter_add_, mul(_) / mul.out, mm (grad_hidden), mm / addmm_ (grad_weight)
    assert len(big) == 4 * 10, big
    # No logsumexp (its hidden [c, V] temporary and second exp pass) and no cast of a whole chunk.
    assert not [op for op, shapes in kb if ("logsumexp" in op or "_to_copy" in op) and chunk_sized(shapes)]
    # Inside a chunk: one weight-dtype [c, V] buffer and one fp32 [c, V] buffer at most (logit_bytes).
    assert b.chunk_bytes_peak <= 6 * V * logit_bytes(dtype), b.chunk_bytes_peak


def test_per_chunk_work_budget_fails_for_a_wasteful_chunk(monkeypatch):
    # Negative control for the counter: an extra fp32 copy of each chunk's logits is seen.
    orig_mm = torch.mm

    def wasteful_mm(a, b, **kw):
        out = orig_mm(a, b, **kw)
        if out.dim() == 2 and out.shape[1] == V:
            out.float().clone()  # a discarded full-chunk copy
        return out

    monkeypatch.setattr(lce.torch, "mm", wasteful_mm)
    a, b = _chunk_ops(torch.float32, 2), _chunk_ops(torch.float32, 4)
    assert (len(_kernels(b)) - len(_kernels(a))) // 2 > 18


def test_the_schedulers_cost_counts_the_ops_matmuls():
    # memory.schedule.node_seconds is what the planner weighs a recompute by. The op runs h @ W.T per chunk and,
    # computing gradients, g @ W and g.T @ h: 2*T*V*H FLOPs each. Costed at its bytes alone (as before the
    # thirteenth session) the 1.5B's plan recomputed the whole op in backward as if it were free (0.24 ms
    # against ~7 ms).
    from unsloth_fx.memory import schedule as S
    from unsloth_fx.memory.trace import trace_function

    def f(h, w, y):
        return torch.ops.unsloth_fx.linear_cross_entropy(h, w, y, -100, 4, 0, "sum", True)[0]

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(T, H, generator=g).requires_grad_(), torch.randn(V, H, generator=g).requires_grad_(),
            torch.randint(0, V, (T,), generator=g)]
    joint, _ = trace_function(f, args, {1: "w"})
    node = next(n for n in joint.graph.nodes if "linear_cross_entropy" in str(n.target))
    dev = S.DeviceModel(flops_per_s=1e6, mem_bytes_per_s=1e15)  # FLOP-bound: bytes are free
    assert S.node_seconds(node, dev) == pytest.approx(6 * T * V * H / 1e6)
    assert len(node.args) == 7  # the trailing default compute_grad=True is dropped in the graph
    node.args = (*node.args, False)  # the forward-only op (inference): logits alone
    assert S.node_seconds(node, dev) == pytest.approx(2 * T * V * H / 1e6)
    # the early check's floor candidates (schedule.minimum_decisions) cost it by its bytes, as before
    assert S.node_seconds(node, dataclasses.replace(dev, lm_head_flops=False)) < 1e-9
