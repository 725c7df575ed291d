"""Grouped (multi-tensor) optimizer updates: `fused_adamw_steps_`, `HybridAdamW.step_params`,
the multi-tensor Triton kernel.

Specification: grouping changes how many host calls and launches an update takes, never its
result. Grouped fused == one-call-per-parameter fused == unfused HybridAdamW, bit for bit
(clipping: within fp32 rounding of the summed norms); a group never holds more gradient
bytes than ``group_bytes`` (unless one gradient alone is larger); every group runs after the
last backward read of each member's old value; the multi-tensor kernel writes exactly the
bits of the per-tensor kernel for every tier.
"""

import copy

import pytest
import torch

import unsloth_fx.backend as backend
from unsloth_fx import fusion
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.passes.fuse_optimizer import plan_groups, update_members, update_order_violations
from unsloth_fx.runtime import adamw as K
from unsloth_fx.zoo import build_model


def _model(name, seed=0, **over):
    torch.manual_seed(seed)
    m = build_model(name, device="cpu", dtype=torch.float32, num_hidden_layers=1, **over)
    m.config.use_cache = False
    return m


def _batches(vocab, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def _train(model, mode, batches, *, impl="reference", tier="fp32", accum=1, clip=None, max_norm=None,
           opt_kwargs=None):
    """mode: "unfused" | "per_param" (group_bytes=0) | an int group_bytes."""
    torch._dynamo.reset()
    opt = HybridAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, state_precision=tier,
                      implementation=impl, **(opt_kwargs or {}))
    fused = mode != "unfused"
    if fused:
        fusion.attach(model, opt, clip=clip, max_norm=max_norm, accumulation_steps=accum)
    gb = 0 if mode == "per_param" else mode
    pipeline = f"fuse_optimizer{{group_bytes={gb}}}" if fused else "fuse_optimizer"
    c = torch.compile(model, backend="unsloth", options={"lower": "eager", "pipeline": pipeline,
                                                        "fuse_optimizer": fused})
    for k, ids in enumerate(batches):
        c(input_ids=ids, labels=ids).loss.backward()
        if (k + 1) % accum:
            continue
        if not fused and clip == "per_param":
            for p in model.parameters():
                p.grad.mul_((max_norm / (torch.linalg.vector_norm(p.grad) + 1e-6)).clamp(max=1.0))
        opt.step()
        opt.zero_grad()
    return opt


def _assert_same(a, b, atol=0.0, rtol=0.0):
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb, pa, atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


def _groups(gm):
    return [[name for _, _, name in update_members(n)] for n in gm.graph.nodes if update_members(n)]


# --------------------------------------------------------------------------
# end to end: grouped == per parameter == unfused
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,impl,tier", [("tiny-qwen2", "auto", "fp32"), ("tiny-llama", "reference", "fp32"),
                                            ("tiny-deepseek-v3", "reference", "fp32"),
                                            ("tiny-llama", "auto", "int8")])
def test_grouped_equals_per_param_equals_unfused(name, impl, tier):
    # "auto": the Triton kernels in the interpreter, the grouped path through the multi-tensor kernel
    batches = _batches(512, 3)
    kw = dict(impl=impl, tier=tier, opt_kwargs={"min_quant_numel": 1024})
    ref, per, grp = _model(name), _model(name), _model(name)
    _train(ref, "unfused", batches, **kw)
    _train(per, "per_param", batches, **kw)
    assert len(_groups(backend.LAST["backward"])) == sum(1 for _ in per.parameters())
    _train(grp, 20_000, batches, **kw)  # a small cap: several groups, some of one parameter
    groups = _groups(backend.LAST["backward"])
    assert 1 < len(groups) < sum(1 for _ in grp.parameters())
    assert update_order_violations(backend.LAST["backward"]) == []
    _assert_same(ref, per)
    _assert_same(ref, grp)
    moved = max((p - q).abs().max().item() for p, q in zip(grp.parameters(), _model(name).parameters()))
    assert moved > 1e-3, "parameters did not train"


def test_groups_respect_the_cap_and_backward_order():
    m = _model("tiny-qwen2")
    cap = 40_000
    _train(m, cap, _batches(512, 1))
    bw = backend.LAST["backward"]
    stats = backend.LAST["ctx"].stats["joint"]["fuse_optimizer"]
    ops = [n for n in bw.graph.nodes if update_members(n)]
    assert stats["update_calls"] == len(ops) and stats["group_bytes"] == cap
    nbytes = {name: p.numel() * p.element_size() for name, p in m.named_parameters()}
    names = [name for n in ops for _, _, name in update_members(n)]
    assert sorted(names) == sorted(nbytes)  # every parameter once
    for n in ops:
        members = [name for _, _, name in update_members(n)]
        total = sum(nbytes[x] for x in members)
        assert total <= cap or len(members) == 1, (members, total)
        assert n.meta["ufx"].notes["group"]["grad_bytes"] == total
    # greedy: a group closes only when the next update would not fit
    for a, b in zip(ops, ops[1:]):
        first_next = update_members(b)[0][2]
        assert sum(nbytes[x] for _, _, x in update_members(a)) + nbytes[first_next] > cap
    # the embedding's gradient is final last (its read is the first forward op): the last group
    assert "model.embed_tokens.weight" in [x for _, _, x in update_members(ops[-1])]


def test_plan_groups_rule():
    b1, b2 = object(), object()
    ups = [(5, 0, b1, 10), (3, 1, b1, 30), (5, 2, b1, 50), (7, 3, b2, 1), (8, 4, b2, 100), (9, 5, b2, 1)]
    got = [[u[1] for u in g] for g in plan_groups(ups, 60)]
    # in update order (position, then index); the binding changes at 3; 100 > cap stands alone
    assert got == [[1, 0], [2], [3], [4], [5]]
    assert [[u[1] for u in g] for g in plan_groups(ups, 0)] == [[1], [0], [2], [3], [4], [5]]
    assert [[u[1] for u in g] for g in plan_groups(ups, 1 << 30)] == [[1, 0, 2], [3, 4, 5]]


def test_tied_accumulation_and_clip_grouped_equal_per_param():
    batches = _batches(512, 4)
    over = {"tie_word_embeddings": True}
    per, grp = _model("tiny-qwen2", **over), _model("tiny-qwen2", **over)
    _train(per, "per_param", batches, accum=2)
    _train(grp, 1 << 26, batches, accum=2)
    names = [x for g in _groups(backend.LAST["backward"]) for x in g]
    assert sum(x in ("lm_head.weight", "model.embed_tokens.weight") for x in names) == 1
    _assert_same(per, grp)
    for clip in ("per_param", "prev_global_norm"):
        a, b, u = _model("tiny-llama"), _model("tiny-llama"), _model("tiny-llama")
        oa = _train(a, "per_param", batches, clip=clip, max_norm=0.5)
        ob = _train(b, 1 << 26, batches, clip=clip, max_norm=0.5)
        # the group sums its squared norms as a vector: last_grad_norm within fp32 rounding
        torch.testing.assert_close(fusion.last_grad_norm(ob), fusion.last_grad_norm(oa), rtol=1e-6, atol=0)
        assert float(fusion.last_grad_norm(oa)) > 0.5, "max_norm must bind"
        _assert_same(a, b, atol=1e-6, rtol=1e-5)
        if clip == "per_param":  # no norm sum enters the update: exact
            _assert_same(a, b)
            _train(u, "unfused", batches, clip=clip, max_norm=0.5)
            _assert_same(u, b, atol=1e-6, rtol=1e-5)


def test_frozen_member_of_a_group_is_not_updated():
    m = _model("tiny-llama")
    batches = _batches(512, 2)
    torch._dynamo.reset()
    opt = HybridAdamW(m.named_parameters(), lr=1e-2, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    c = torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": "fuse_optimizer",
                                                    "fuse_optimizer": True})
    c(input_ids=batches[0], labels=batches[0]).loss.backward()
    w = m.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    # call the compiled group op directly with the parameter frozen (Dynamo would recompile first)
    bw = backend.LAST["backward"]
    op = next(n for n in bw.graph.nodes if update_members(n))
    names, slots = op.args[2], op.args[3]
    params = [dict(m.named_parameters())[x] for x in names]
    w.requires_grad_(False)
    torch.ops.unsloth_fx.fused_adamw_steps_(params, [torch.ones_like(p) for p in params], names, slots, [])
    assert torch.equal(w, before)
    other = params[0] if params[0] is not w else params[1]
    assert float(opt.state[other]["step"]) == 2.0 and float(opt.state[w]["step"]) == 1.0


# --------------------------------------------------------------------------
# HybridAdamW.step(): the same grouped path, same bits as one parameter at a time
# --------------------------------------------------------------------------

@pytest.mark.parametrize("tier,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                        ("int8", torch.float32), ("hybrid", torch.bfloat16)])
def test_step_equals_step_param_loop(tier, dtype):
    torch.manual_seed(0)
    shapes = [(64, 40), (40,), (300,), (33, 70)]
    a = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, state_precision=tier, quantize_all=True, gate_every=2, hybrid_cap=0.5)
    oa, ob = HybridAdamW(a, **kw), HybridAdamW(b, **kw)
    launches = []
    orig = K.adamw_step_many
    K.adamw_step_many = lambda *x, **y: (launches.append(len(x[1])), orig(*x, **y))[1]
    try:
        for step in range(4):
            grads = [(torch.randn(s) * 1e-2).to(dtype) for s in shapes]
            if step == 2:
                grads[2][5] = float("inf")  # a skipped parameter among updated ones
            for p, q, g in zip(a, b, grads):
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            for q in b:  # the one-parameter path
                ob.step_param(q, q.grad)
    finally:
        K.adamw_step_many = orig
    assert launches, "step() did not take the grouped kernel path"
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ob.state[q][k]), k
    assert oa.nonfinite_skips() == ob.nonfinite_skips() == 1


def test_bookkeeping_many_matches_one_at_a_time():
    norms = [torch.tensor(1.5), torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(0.0)]
    steps = [torch.tensor(float(k)) for k in range(4)]
    skips = [torch.tensor(float(k % 2)) for k in range(4)]
    s2, k2 = copy.deepcopy(steps), copy.deepcopy(skips)
    found = K.step_bookkeeping_many_(norms, steps, skips)
    one = [K.step_bookkeeping_(n, s, k) for n, s, k in zip(norms, s2, k2)]
    assert [float(f) for f in found] == [float(f) for f in one] == [0.0, 1.0, 1.0, 0.0]
    assert [float(s) for s in steps] == [float(s) for s in s2] == [1.0, 1.0, 2.0, 4.0]
    assert [float(s) for s in skips] == [float(s) for s in k2] == [0.0, 2.0, 1.0, 1.0]


# --------------------------------------------------------------------------
# the multi-tensor kernel against the per-tensor kernel, bit for bit
# --------------------------------------------------------------------------

def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("tier", ["fp32", "bf16", "int8", "int4", "hybrid"])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_multi_tensor_kernel_matches_per_tensor_kernel(tier, dtype, sr, monkeypatch):
    assert K.uses_triton(torch.empty(1)), "the test needs the Triton interpreter (TRITON_INTERPRET=1)"
    torch.manual_seed(0)
    shapes = [(300,), (0,), (5000,), (128,), (2100,)]  # partial blocks, an empty one, several programs
    ps = [(torch.randn(s)).to(dtype) for s in shapes]
    gs = [(torch.randn(s) * 1e-2).to(dtype) for s in shapes]
    gs[2][7] = float("nan")  # a non-finite block is never written
    sts = []
    for k, p in enumerate(ps):
        st = K.init_state(tier, p, hybrid_bits=4, hybrid_cap=0.5)
        st["step"] = torch.tensor(3.0 + k)
        st["seed"] = 11 + k * 7919
        if tier == "hybrid" and st["pool_m"].shape[0]:
            n = st["pool_m"].shape[0]
            st["slot"][: 2 * n: 2] = torch.arange(n, dtype=torch.int32)[: st["slot"][: 2 * n: 2].numel()]
            st["pool_m"].normal_()
            st["pool_v"].uniform_()
        sts.append(st)
    found = [torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0)]
    before = [p.clone() for p in ps]
    ps2, sts2 = [p.clone() for p in ps], copy.deepcopy(sts)
    hy = dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)), eps=torch.tensor(1e-8),
              weight_decay=torch.tensor(0.1))
    calls = []
    kernel = K._adamw_multi_kernel
    monkeypatch.setattr(K, "_adamw_multi_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), kernel[grid])[1]})())
    K.adamw_step_many(tier, ps, gs, sts, found_infs=found, stochastic_rounding=sr, **hy)
    assert len(calls) == 1, "one launch for the whole list"
    monkeypatch.setattr(K, "_adamw_multi_kernel", kernel)
    for p, g, st, f in zip(ps2, gs, sts2, found):
        K.adamw_step_state(tier, p, g, st, step=st["step"], found_inf=f, seed=st["seed"],
                           stochastic_rounding=sr, **hy)
    for k, (a, b) in enumerate(zip(ps, ps2)):
        assert torch.equal(_bits(a), _bits(b)), f"param {k}"
    for k, (sa, sb) in enumerate(zip(sts, sts2)):
        for key, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(_bits(v), _bits(sb[key])), f"param {k} state {key}"
    assert not torch.equal(ps[0], before[0]) and not torch.equal(ps[4], before[4]), "nothing was updated"
    assert torch.equal(_bits(ps[3]), _bits(before[3])), "found_inf=1 must skip the parameter"


class _TwoMatmuls(torch.nn.Module):
    # w2's gradient is final before the backward matmul that reads w2 (dh = dy @ w2.T) runs:
    # placement by gradient alone would update w2 too early
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32, 64) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(64, 16) * 0.1)

    def forward(self, x):
        return (torch.relu(x @ self.w1) @ self.w2).square().sum()


@pytest.mark.parametrize("group_bytes", [0, 1 << 26])
def test_group_waits_for_the_last_read_of_every_member(group_bytes):
    xs = [torch.randn(8, 32, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    out = []
    for fused in (False, True):
        torch._dynamo.reset()
        m = _TwoMatmuls()
        opt = HybridAdamW(m.parameters(), lr=1e-2, state_precision="fp32", implementation="reference")
        if fused:
            fusion.attach(m, opt)
        c = torch.compile(m, backend="unsloth", options={
            "lower": "eager", "fuse_optimizer": fused, "pipeline": f"fuse_optimizer{{group_bytes={group_bytes}}}"})
        for x in xs:
            c(x).backward()
            opt.step()
            opt.zero_grad()
        out.append(m)
    bw = backend.LAST["backward"]
    assert len(_groups(bw)) == (1 if group_bytes else 2)
    assert update_order_violations(bw) == []
    _assert_same(out[0], out[1])
