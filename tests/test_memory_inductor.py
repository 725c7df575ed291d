"""lower="inductor" timelines: pointwise chains Inductor fuses into their consumers are not materialized
(issue 3: the FX-level walk over-predicted the H100 peaks by the fp32 cross-entropy intermediates)."""

import torch
import torch.nn.functional as F

from unsloth_fx import _compat
from unsloth_fx.memory import model as M

T, V, H = 64, 1024, 32  # tokens, vocab, hidden


def _ce_joint():
    def f(h, w, y):
        logits = h @ w.t()  # bf16 [T, V], returned (as HF returns logits) and upcast for the loss
        return F.cross_entropy(logits.float(), y), logits

    with _compat.fake_tensor_mode_cls()():
        h = torch.empty(T, H, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(V, H, dtype=torch.bfloat16, requires_grad=True)
        y = torch.zeros(T, dtype=torch.long)
        return _compat.aot_trace_joint_decomposed(f, [h, w, y], _compat.inductor_decompositions())


def test_cross_entropy_fp32_intermediates_not_materialized_under_inductor():
    joint, nfwd = _ce_joint()
    tl = M.predict(joint, nfwd, M.Static(lower="inductor"))
    bf16_tv, fp32_tv = T * V * 2, T * V * 4  # 131072, 262144 (multiples of 512)
    # Inductor fuses upcast, log-softmax, the scatter-upon-zeros of nll_loss_backward, the softmax
    # backward and the downcast: no fp32 [T, V] buffer exists.
    assert max(e.bytes for e in tl.events) == bf16_tv
    assert not any(e.bytes == fp32_tv for e in tl.events)
    # Peak (backward, when the bf16 logits gradient is written): saved bf16 logits + the zero tangent
    # AOTAutograd materializes for the returned logits + the bf16 logits gradient = 3 * 131072, plus
    # five 512-B blocks: saved amax [T,1] and log-sum-exp [T,1], saved token count (0-d), the loss
    # tangent (0-d), and the softmax-backward row sum [T,1].
    assert (tl.peak_phase, tl.peak_node) == ("backward", "add")
    assert tl.peak == 3 * bf16_tv + 5 * 512 == 395776


def test_eager_lowering_still_materializes_every_node():
    joint, nfwd = _ce_joint()
    eager = M.predict(joint, nfwd, M.Static(lower="eager"))
    default = M.predict(joint, nfwd, M.Static())
    assert eager.peak == default.peak  # eager is the default
    assert any(e.bytes == T * V * 4 for e in eager.events)  # fp32 [T, V] buffers exist
    assert eager.peak == 918528  # the FX walk: fp32 [T, V] pairs alive in backward
    assert eager.peak > M.predict(joint, nfwd, M.Static(lower="inductor")).peak


def test_pointwise_feeding_a_matmul_is_materialized():
    # (x * 2) @ w: mm is an extern kernel, so its pointwise input must exist as a buffer
    def f(x, w):
        return ((x * 2) @ w).sum()

    with _compat.fake_tensor_mode_cls()():
        x = torch.empty(128, 64, requires_grad=True)
        w = torch.empty(64, 64, requires_grad=True)
        joint, nfwd = _compat.aot_trace_joint_decomposed(f, [x, w], _compat.inductor_decompositions())
    fw, bw = M.partition(joint, nfwd)
    nodes = list(fw.graph.nodes)

    def storage(n):
        return (_compat.node_storage(n) or ("node", n.name)) if isinstance(n.meta.get("val"), torch.Tensor) else None

    inl = M.inductor_inlined(nodes, storage, set())
    mul = next(n for n in nodes if n.target is torch.ops.aten.mul.Tensor)
    assert storage(mul) not in inl
    tl = M.predict(joint, nfwd, M.Static(lower="inductor"))
    assert any(e.node == mul.name and e.kind == "alloc" and e.bytes == 128 * 64 * 4 for e in tl.events)


def test_static_from_graph_records_lowering():
    joint, nfwd = _ce_joint()
    assert M.static_from_graph(joint, "sgd", lower="inductor").lower == "inductor"
    assert M.static_from_graph(joint, "sgd").lower == "eager"
