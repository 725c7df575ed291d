"""Memory model and budget scheduler: hand-computed timelines, allocator rounding, views,
attention sizing, plans that fit, numerics unchanged by decisions, the plan_memory pass."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unsloth_fx.backend as backend
from unsloth_fx.memory import model as M
from unsloth_fx.memory import schedule as S
from unsloth_fx.memory.trace import _efficient_sdpa, trace_function
from unsloth_fx.pass_base import PassContext, get_pass
from unsloth_fx.options import Options

KiB = 1024


def _relu_mm():
    w = torch.randn(256, 512, requires_grad=True)
    x = torch.randn(64, 256)
    joint, nfwd = trace_function(lambda w, x: torch.relu(x @ w).sum(), [w, x], {0: "w"})
    return joint, nfwd


def test_hand_computed_timeline_of_relu_matmul():
    # w: 256x512 fp32 = 512 KiB, x: 64x256 fp32 = 64 KiB, mm/relu: 64x512 fp32 = 128 KiB.
    joint, nfwd = _relu_mm()
    static = M.static_from_graph(joint, "adamw")
    assert (static.parameters, static.gradients, static.optimizer_state, static.optimizer_temp, static.inputs) == (
        512 * KiB, 512 * KiB, 1024 * KiB, 512 * KiB, 64 * KiB)
    tl = M.predict(joint, nfwd, static, how="default")
    resident = 512 * KiB + 1024 * KiB + 64 * KiB
    assert tl.saved == {"relu": 128 * KiB}  # relu's output is all backward needs (x is an input)
    allocs = [(e.node, e.bytes, e.category) for e in tl.events if e.kind == "alloc" and e.phase != "optimizer"]
    assert allocs[:2] == [("mm", 128 * KiB, "transient"), ("relu", 128 * KiB, "saved")]
    assert ("mm_1", 512 * KiB, "gradients") in allocs
    fwd_peak = max(e.live_bytes for e in tl.events if e.phase == "forward")
    assert fwd_peak == resident + 2 * 128 * KiB  # mm and relu both alive while relu runs
    # the step's peak: gradients + AdamW's foreach temporaries (sqrt(v), 4 B/param) in optimizer.step()
    assert tl.peak == resident + 512 * KiB + 512 * KiB and tl.peak_phase == "optimizer"


def test_allocator_rounding_and_fused_optimizer_static():
    assert [M.round_block(n) for n in (0, 1, 512, 513, 2**20 + 1)] == [0, 512, 512, 1024, 2**20 + 512]
    s = M.static_breakdown([(1000, torch.bfloat16, True, False), (10, torch.float32, False, True)], "adamw-bf16")
    assert (s.parameters, s.buffers, s.gradients, s.optimizer_state) == (2048, 512, 2048, 4096)
    f = M.static_breakdown([(1000, torch.bfloat16, True, False)], "int4", fuse_optimizer=True)
    assert f.gradients == 0 and f.optimizer_state == 1024
    with pytest.raises(ValueError, match="optimizer='lion'"):
        M.static_breakdown([], "lion")


def test_views_allocate_nothing():
    w = torch.randn(32, 64, requires_grad=True)
    x = torch.randn(16, 32)

    def f(w, x):
        y = x @ w
        return (y.view(-1).unsqueeze(0).t() * 2).sum()

    joint, nfwd = trace_function(f, [w, x], {0: "w"})
    tl = M.predict(joint, nfwd, M.static_from_graph(joint), how="default")
    alloc_nodes = {e.node for e in tl.events if e.kind == "alloc"}
    views = {n.name for n in joint.graph.nodes if n.op == "call_function"
             and any(k in str(n.target) for k in ("view", "unsqueeze", "aten.t."))}
    assert views and not (views & alloc_nodes)


def test_attention_is_sized_like_a_fused_kernel():
    s, h, d = 256, 4, 16
    q = torch.randn(1, h, s, d, requires_grad=True)

    def f(q):
        return _efficient_sdpa(q, q, q, is_causal=True).sum()

    joint, nfwd = trace_function(f, [q], {0: "q"})
    tl = M.predict(joint, nfwd, M.static_from_graph(joint))
    biggest = max(e.bytes for e in tl.events if e.kind == "alloc" and e.phase != "optimizer")
    assert biggest < s * s * 4  # never an s x s score matrix
    assert biggest >= M.round_block(s * h * d * 4)


def test_unbacked_sizes_are_bounded_and_flagged():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        u = env.create_unbacked_symint()
        t = torch.empty(u, 4)
    info = M.storage_size(t, unbacked_default=1000)
    assert info.unbacked and info.nbytes == 1000 * 4 * 4


def _chain(ops, n=16, d=24):
    """A generated chain of pointwise / matmul / reduction ops over two weights."""
    def f(w1, w2, x):
        h = x @ w1  # every chain needs both weights' gradients
        for i, op in enumerate(ops):
            if op == "matmul":
                h = h @ (w1 if i % 2 == 0 else w2)
            elif op == "sin":
                h = torch.sin(h)
            elif op == "relu":
                h = torch.relu(h) + 0.1 * h
            elif op == "mul":
                h = h * h * 0.5
            elif op == "softmax":
                h = torch.softmax(h, dim=-1) * d
            elif op == "norm":
                h = h / (h.pow(2).mean(-1, keepdim=True) + 1).sqrt()
        return (h @ w2).pow(2).sum()
    torch.manual_seed(0)
    args = [torch.randn(d, d, requires_grad=True) * 0.3, torch.randn(d, d, requires_grad=True) * 0.3,
            torch.randn(n, d)]
    args = [a.detach().requires_grad_(i < 2) for i, a in enumerate(args)]
    return f, args


def _run_partitioned(joint, nfwd, args):
    """Execute the min-cut partition of ``joint`` on real tensors: (loss, grads)."""
    fw, bw = M.partition(joint, nfwd)
    outs = fw(*args)
    fw_out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    by_name = {a.name: v for a, v in zip(fw_out, outs) if isinstance(a, torch.fx.Node)}
    bw_args = []
    for n in bw.graph.nodes:
        if n.op == "placeholder":
            bw_args.append(torch.ones(()) if n.name.startswith("tangents") else by_name[n.name])
    grads = bw(*bw_args)
    return outs[0], [g for g in grads if g is not None]


OPS = st.lists(st.sampled_from(["matmul", "sin", "relu", "mul", "softmax", "norm"]), min_size=2, max_size=7)


@settings(max_examples=12, deadline=None)
@given(ops=OPS, frac=st.floats(0.0, 1.0))
def test_feasible_plans_fit_and_keep_numerics(ops, frac):
    f, args = _chain(ops)
    joint, nfwd = trace_function(f, args, {0: "w1", 1: "w2"})
    static = M.static_from_graph(joint, "sgd")
    base = M.predict(joint, nfwd, static)
    _, mn = S.minimum_plan(joint, nfwd, static, S.DeviceModel())
    lo = min(mn.peak, base.peak)
    budget = int(lo * 0.9 + frac * (base.peak - lo * 0.9))
    try:
        plan = S.plan(joint, nfwd, static, budget)
    except S.InfeasibleBudget as e:
        assert budget < e.smallest_feasible and "smallest feasible budget" in str(e)
        return
    assert plan.feasible and plan.timeline.peak <= budget
    assert plan.modified == (base.peak > budget)
    # every decision is carried out by the partitioner and leaves numerics unchanged
    loss, grads = _run_partitioned(joint, nfwd, args)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    ref = f(*ref_args)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, [a.grad for a in ref_args if a.requires_grad]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_plan_recomputes_when_the_budget_is_tight_and_not_otherwise():
    f, args = _chain(["matmul", "sin", "matmul", "sin", "matmul", "sin", "matmul", "sin"], n=512, d=32)
    joint, nfwd = trace_function(f, args, {0: "w1", 1: "w2"})
    static = M.static_from_graph(joint, "sgd")
    base = M.predict(joint, nfwd, static)
    loose = S.plan(joint, nfwd, static, base.peak + 2**20)
    assert not loose.modified and not loose.decisions
    assert not any("recompute" in n.meta for n in joint.graph.nodes)
    # tighter than the baseline: the plan either fits (and says how) or names the smallest budget
    try:
        tight = S.plan(joint, nfwd, static, base.peak - 1)
    except S.InfeasibleBudget as e:
        assert e.smallest_feasible >= base.peak - 1
    else:
        assert tight.modified and tight.timeline.peak < base.peak


def test_infeasible_budget_names_the_breakdown_and_the_smallest_budget():
    joint, nfwd = _relu_mm()
    static = M.static_from_graph(joint, "adamw")
    with pytest.raises(ValueError) as ei:
        S.plan(joint, nfwd, static, 1 * 2**20)
    e = ei.value
    assert isinstance(e, S.InfeasibleBudget)
    msg = str(e)
    for part in ("parameters 512.00 KiB", "gradients 512.00 KiB", "optimizer state 1.00 MiB",
                 "minimum activations", "smallest feasible budget"):
        assert part in msg, msg
    assert e.smallest_feasible >= 2686976
    S.plan(joint, nfwd, static, e.smallest_feasible)  # the suggested budget itself is feasible


def test_layer_extrapolation_matches_a_full_trace():
    from unsloth_fx.memory import whole as W

    dev = S.DeviceModel()
    args = ("tiny-llama",)
    v1, v2, v4 = (W._variant_dense(*args, L, 1, 256, torch.bfloat16, "adamw", False, dev, None) for L in (1, 2, 4))
    for f in (lambda v: v.act(v.base), lambda v: v.act(v.minimum)):
        ext = f(v1) + 3 * (f(v2) - f(v1))
        assert abs(ext - f(v4)) <= 0.02 * f(v4), (ext, f(v4))


def _tiny_pair():
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    ref = build_model("tiny-qwen2", device="cpu", dtype=torch.float32)
    ours = build_model("tiny-qwen2", device="cpu", dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    ref.config.use_cache = ours.config.use_cache = False
    return ref, ours, torch.randint(0, 512, (2, 128))


def test_plan_memory_pass_through_the_backend(tmp_path):
    torch._dynamo.reset()
    ref, ours, ids = _tiny_pair()
    f = torch.compile(ours, backend="unsloth", options={"lower": "eager"})
    f(input_ids=ids, labels=ids).loss.backward()
    st0 = backend.LAST["ctx"].stats["joint"]["plan_memory"]
    assert st0["modified"] is False and st0["budget"] is None and st0["predicted_peak"] > 0

    torch._dynamo.reset()
    ours.zero_grad(set_to_none=True)
    budget = int(st0["predicted_peak"] * 0.93)
    f = torch.compile(ours, backend="unsloth", options={"lower": "eager", "memory_budget": budget,
                                                        "dump": str(tmp_path)})
    loss = f(input_ids=ids, labels=ids).loss
    loss.backward()
    ctx = backend.LAST["ctx"]
    st1 = ctx.stats["joint"]["plan_memory"]
    assert st1["modified"] is True and st1["predicted_peak"] <= budget and st1["recompute"] > 0
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-4, atol=2e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert isinstance(ctx.shared["memory_plan"], S.Plan)
    # the schedule files: versioned JSON, self-contained HTML, PNG
    gdir = tmp_path / "graph_001" if (tmp_path / "graph_001").exists() else next(tmp_path.glob("graph_*"))
    doc = json.loads((gdir / "memory_schedule.json").read_text())
    assert doc["schema"] == "unsloth_fx.memory_schedule/1" and doc["predicted_peak"] == st1["predicted_peak"]
    ev = doc["events"][0]
    assert {"step", "node", "bytes", "live_bytes", "category", "decision", "source"} <= set(ev)
    assert max(e["live_bytes"] for e in doc["events"]) == doc["predicted_peak"]
    page = (gdir / "memory_schedule.html").read_text()
    assert "<svg" in page and "<title>" in page and "src=\"http" not in page and "<script src" not in page
    assert (gdir / "memory_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # idempotent: the pass on its own output changes nothing
    joint = backend.LAST["joint"]
    again = get_pass("plan_memory").run(joint, PassContext(options=Options.from_user({"memory_budget": budget}),
                                                           params=ctx.params, num_fwd_outputs=ctx.num_fwd_outputs))
    assert again.modified is False and again.stats["predicted_peak"] <= budget


def test_the_planners_partition_writes_no_code_until_a_graph_runs():
    # the planner partitions to walk the graphs; writing their Python code cost a quarter of the 7B's plan
    joint, nfwd = _relu_mm()
    fw, bw = M.partition(joint, nfwd)
    assert "_code" not in fw.__dict__  # GraphModule.recompile sets _code; a lazy module defers it
    w, x = torch.randn(256, 512), torch.randn(64, 256)
    out = fw(w, x)  # still runnable: the code is written on the first call
    assert torch.allclose(out[0], torch.relu(x @ w).sum())
    assert "_code" in fw.__dict__


def test_the_partition_cache_walks_the_same_graphs_for_each_policy(monkeypatch):
    from unsloth_fx.memory import whole
    from unsloth_fx.zoo import build_model

    tr = whole.trace_step(build_model("tiny-qwen2", device="meta"), 1, 64, torch.bfloat16, 4, "inductor")
    dev = S.DeviceModel()

    def candidates(spec):
        st = whole._set_lower(M.static_breakdown(tr.rows, spec, True), "inductor")
        st.inputs = M.inputs_bytes(tr.joint)
        return whole.minimum_candidates(tr.joint, tr.nfwd, st, dev)

    def sig(tl):  # the offload walker's frees within one step come in no fixed order: compare them as a multiset
        return None if tl is None else (tl.peak, tl.peak_node, tl.saved_bytes,
                                        sorted(str((e.kind, e.node, e.bytes, e.step)) for e in tl.events))

    specs = ("hybrid", "int4/int4", "int8/int8")
    want = {s: [sig(t) for t in candidates(s)] for s in specs}
    calls = []
    real = M.partition
    monkeypatch.setattr(M, "partition", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(S, "partition", M.partition)
    with S.partition_cache():
        got = {s: [sig(t) for t in candidates(s)] for s in specs}
    assert got == want
    assert want["hybrid"][0][0] != want["int4/int4"][0][0]  # the policies do differ (their static bytes)
    n_plans = sum(t is not None for t in want["hybrid"])  # all saved, then the candidates that found a plan
    assert n_plans >= 3 and len(calls) == n_plans  # partitioned once per plan, not once per plan and policy


def _closure_knapsack(rng, m):
    """A random instance of the planner's integer problem without offload: per node keep / recompute,
    a value backward reads kept or recomputed, a recompute needs its inputs kept or recomputed, the kept
    bytes under a limit. Returns (c, constraint, integrality, lb, ub, limit row)."""
    import numpy as np
    from scipy.optimize import LinearConstraint

    rows, lo, hi = [], [], []
    for i in range(m):
        if rng.random() < 0.5:
            rows.append({i: 1.0, m + i: 1.0}); lo.append(1.0); hi.append(np.inf)
        for j in rng.choice(i, size=min(i, int(rng.integers(0, 3))), replace=False) if i else []:
            rows.append({int(j): 1.0, m + int(j): 1.0, m + i: -1.0}); lo.append(0.0); hi.append(np.inf)
    size = rng.integers(1, 100, m).astype(float)
    rows.append({i: size[i] for i in range(m)}); lo.append(-np.inf); hi.append(float(size.sum() * rng.uniform(0.1, 0.6)))
    A = np.zeros((len(rows), 2 * m))
    for r, coef in enumerate(rows):
        for k, v in coef.items():
            A[r, k] = v
    cost = rng.choice([0.0, 1.0, 5.0, 30.0], m) * rng.uniform(0.5, 1.5, m)
    c = np.concatenate([size * 1e-6, cost + 1e-6])
    ub = np.concatenate([np.ones(m), (rng.random(m) > 0.15).astype(float)])  # some ops cannot be recomputed
    return c, LinearConstraint(A, np.array(lo), np.array(hi)), np.ones(2 * m), np.zeros(2 * m), ub


def test_two_stage_milp_is_feasible_and_within_the_gap_of_the_optimum():
    """_milp solves the LP relaxation, then the integers it left fractional; its plan must satisfy every
    constraint and be within MIP_REL_GAP of the true optimum (HiGHS with no gap), or both say infeasible."""
    import numpy as np
    from scipy.optimize import Bounds, milp

    rng = np.random.default_rng(0)
    how = []
    for _ in range(60):
        c, cons, integ, lb, ub = _closure_knapsack(rng, int(rng.integers(5, 40)))
        exact = milp(c, constraints=[cons], integrality=integ, bounds=Bounds(lb, ub), options={"mip_rel_gap": 0})
        x = S._milp(c, cons, integ, lb, ub)
        how.append(S.LAST_MILP["how"])
        assert (x is None) == (exact.x is None), S.LAST_MILP
        if x is None:
            continue
        assert np.allclose(x, np.round(x)) and np.all(x >= lb - 1e-9) and np.all(x <= ub + 1e-9)
        ax = cons.A @ x
        assert np.all(ax >= cons.lb - 1e-6) and np.all(ax <= cons.ub + 1e-6)
        assert c @ x <= exact.fun + S.MIP_REL_GAP * abs(exact.fun) + 1e-9, (c @ x, exact.fun, S.LAST_MILP)
    assert {"fixed", "full", "lp-infeasible"} <= set(how)  # each path taken (seed 0: 20, 36 and 4 times)


def test_two_stage_milp_solves_the_whole_problem_when_the_fixed_one_is_not_close_enough():
    """min -y - x/10 with y + 2x <= 1.5 (binary): the LP takes y = 1, x = 1/4 (bound -1.025). With y fixed
    the best is -1, 2.4% off the bound, more than MIP_REL_GAP: the whole MILP decides (-1, the optimum).
    An infeasible relaxation returns None without an integer solve."""
    import numpy as np
    from scipy.optimize import LinearConstraint

    c = np.array([-1.0, -0.1])
    x = S._milp(c, LinearConstraint(np.array([[1.0, 2.0]]), -np.inf, 1.5), np.ones(2), np.zeros(2), np.ones(2))
    assert S.LAST_MILP["how"] == "full" and S.LAST_MILP["bound"] == pytest.approx(-1.025)
    assert list(np.round(x)) == [1.0, 0.0]
    assert S._milp(c, LinearConstraint(np.array([[1.0, 1.0]]), 3.0, np.inf), np.ones(2), np.zeros(2),
                   np.ones(2)) is None
    assert S.LAST_MILP["how"] == "lp-infeasible"
