"""The plan's FLOP count: ``Plan.step_flops`` (the joint graph's matmuls) and ``Plan.recompute_flops`` (what its
recomputes add), by hand on a two-matmul step, and carried into plan_memory's stats and report."""

import torch

from unsloth_fx.memory import model as M
from unsloth_fx.memory import schedule as S
from unsloth_fx.memory.trace import trace_function

N, D = 4096, 32  # every matmul below is [4096 x 32] @ [32 x 32] or its transpose: 2 * 4096 * 32 * 32 FLOP
MM = 2 * N * D * D


def _step():
    def f(w1, w2, w3, x):
        b1 = torch.sin(x @ w1)  # sin's backward reads its input, the matmul's its inputs
        b2 = torch.sin(b1 @ w2)
        return torch.sin(b2 @ w3).sum()

    torch.manual_seed(0)
    args = [torch.randn(D, D, requires_grad=True) for _ in range(3)] + [torch.randn(N, D)]
    return trace_function(f, args, {0: "w1", 1: "w2", 2: "w3"})


def test_step_flops_by_hand():
    joint, nfwd = _step()
    # forward: three matmuls; backward: grad_w3, grad_b2, grad_w2, grad_b1 and grad_w1 (x needs no gradient):
    # eight matmuls of MM FLOP; sin, sum and the views count no FLOPs
    assert S.step_flops(joint, S.DeviceModel()) == 8 * MM
    mm = next(n for n in joint.graph.nodes if n.op == "call_function" and n.name == "mm")
    assert S.node_flops(mm, S.DeviceModel()) == MM
    sin = next(n for n in joint.graph.nodes if n.op == "call_function" and "sin" in n.name)
    assert S.node_flops(sin, S.DeviceModel()) == 0.0


def test_recompute_flops_counts_the_recomputed_matmul():
    joint, nfwd = _step()
    static = M.static_from_graph(joint, "sgd")
    dev = S.DeviceModel(offload=False)
    loose = S.plan(joint, nfwd, static, M.predict(joint, nfwd, static).peak + 2**20, dev)
    assert loose.recompute_flops == 0.0 and loose.step_flops == 8 * MM
    _, mn = S.minimum_plan(joint, nfwd, static, dev)
    tight = S.plan(joint, nfwd, static, mn.peak, dev)
    rec = [k for k, v in tight.decisions.items() if v == "recompute"]
    assert rec, tight.decisions
    # at the smallest plan's peak the first matmul's output (x @ w1) is among the recomputed values
    assert "mm" in rec
    assert tight.recompute_flops == MM * sum(1 for k in rec if k.startswith("mm"))
    assert tight.summary()["recompute_flops"] == tight.recompute_flops
    assert tight.summary()["step_flops"] == 8 * MM


def test_plan_memory_reports_the_recompute_flops():
    from unsloth_fx.pass_base import PassContext, get_pass
    from unsloth_fx.options import Options

    joint, nfwd = _step()
    static = M.static_from_graph(joint, "sgd")
    _, mn = S.minimum_plan(joint, nfwd, static, S.DeviceModel(offload=False))
    ctx = PassContext(options=Options.from_user({"memory_budget": mn.peak}), num_fwd_outputs=nfwd)
    res = get_pass("plan_memory").run(joint, ctx, optimizer="sgd", offload=False)
    assert res.stats["recompute_flops"] >= MM and res.stats["step_flops"] == 8 * MM
    text = ctx.artifacts["memory_schedule.txt"] if "memory_schedule.txt" in ctx.artifacts else str(ctx.artifacts)
    assert "TFLOP of matmul and attention" in text


def test_attention_backward_counts_twice_the_forward():
    """Self-attention forward is two products of 2 x queries x keys x head dim each (QK^T, PV); its backward four
    (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q). Traced as the planner traces a model (memory-efficient
    attention on fake tensors, as trace_step does for a CUDA step)."""
    from unsloth_fx.memory.trace import cuda_like_tracing

    B, H, T, Dh, Tk = 1, 2, 64, 16, 64

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum()

    args = [torch.randn(B, H, T, Dh, requires_grad=True) for _ in range(3)]
    with cuda_like_tracing():
        joint, _ = trace_function(f, args)
    att = [n for n in joint.graph.nodes if n.op == "call_function" and "attention" in str(n.target)]
    fwd = [n for n in att if "backward" not in str(n.target)]
    bwd = [n for n in att if "backward" in str(n.target)]
    assert len(fwd) == 1 and len(bwd) == 1, [str(n.target) for n in att]
    per = 2 * B * H * T * Tk * Dh  # one of the products
    assert S.node_flops(fwd[0], S.DeviceModel()) == 2 * per
    assert S.node_flops(bwd[0], S.DeviceModel()) == 4 * per
    assert S.step_flops(joint, S.DeviceModel()) == 6 * per
