"""`fuse_optimizer`: HybridAdamW updates run inside the compiled backward.

Specification: with ``fuse_optimizer=True`` training gives the same parameters
as unfused HybridAdamW (same tier; identical here, both call the same kernel
on the same gradient), ``param.grad`` stays None, every update sits after the
last backward read of its parameter, and accumulation / clipping / schedulers /
checkpoints / frozen parameters keep their meaning.
"""

import copy
import re

import pytest
import torch
from torch.testing import FileCheck

import unsloth_fx.backend as backend
from unsloth_fx import _compat, fusion
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.passes.fuse_optimizer import fuse_optimizer, update_members, update_order_violations
from unsloth_fx.zoo import build_model

# plan_memory is not under test here and costs seconds per compile
OPTS = {"lower": "eager", "pipeline": "fuse_optimizer"}
OP = "torch.ops.unsloth_fx.fused_adamw_step_.default"


def _model(name, seed=0, **over):
    torch.manual_seed(seed)
    m = build_model(name, device="cpu", dtype=torch.float32, **over)
    m.config.use_cache = False
    return m


def _batches(n, vocab, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(steps * n)]


def _train(model, fused, batches, *, tier="fp32", impl="reference", accum=1, clip=None, max_norm=None,
           sched=True, on_step=None, opt_kwargs=None, lower="eager"):
    """Train on ``batches`` (``accum`` micro-batches per step); unfused clipping mirrors ``clip``."""
    torch._dynamo.reset()
    opt = HybridAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, state_precision=tier,
                      implementation=impl, **(opt_kwargs or {}))
    if fused:
        fusion.attach(model, opt, clip=clip, max_norm=max_norm, accumulation_steps=accum)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
    c = torch.compile(model, backend="unsloth", options={**OPTS, "fuse_optimizer": fused, "lower": lower})
    prev_norm, norms = None, []
    for k, ids in enumerate(batches):
        c(input_ids=ids, labels=ids).loss.backward()
        if (k + 1) % accum:
            continue
        if fused:
            assert all(p.grad is None for p in model.parameters()), "fused backward left a gradient"
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            norms.append(norm)
            if clip == "per_param":
                for g in grads:
                    g.mul_((max_norm / (torch.linalg.vector_norm(g) + 1e-6)).clamp(max=1.0))
            elif clip == "prev_global_norm" and prev_norm is not None:
                for g in grads:
                    g.mul_((max_norm / (prev_norm + 1e-6)).clamp(max=1.0))
            prev_norm = norm
        opt.step()
        opt.zero_grad()
        if lr is not None:
            lr.step()
        if fused:
            norms.append(fusion.last_grad_norm(opt))
        if on_step is not None:
            on_step(k // accum, model, opt)
    return opt, norms


def _assert_params_equal(a, b, atol=0.0, rtol=0.0):
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb, pa, atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


def _fused_ops(gm):
    """Update op nodes of either kind (one parameter, or a group)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and "fused_adamw_step" in str(n.target)]


def _members(gm):
    """[(parameter node, gradient node, name, op node)] over every update in ``gm``."""
    return [(w, g, name, n) for n in _fused_ops(gm) for w, g, name in update_members(n)]


UNGROUPED = "fuse_optimizer{group_bytes=0}"


# --------------------------------------------------------------------------
# numerics: 10 steps fused == unfused
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,impl", [("tiny-qwen2", "auto"), ("tiny-llama", "reference"),
                                       ("tiny-deepseek-v3", "reference")])
def test_ten_fused_steps_match_unfused_hybrid_adamw(name, impl):
    # "auto" runs the Triton kernel (interpreter, TRITON_INTERPRET=1 from conftest) inside backward;
    # one layer keeps the interpreter's ~0.1 s per launch (and the CI budget) affordable
    over = {"num_hidden_layers": 1}
    batches = _batches(1, 512, 10)
    ref, ours = _model(name, **over), _model(name, **over)
    _train(ref, False, batches, impl=impl)
    _train(ours, True, batches, impl=impl)
    n_trainable = sum(1 for p in ours.parameters() if p.requires_grad)
    assert len(_members(backend.LAST["backward"])) == n_trainable
    stats = backend.LAST["ctx"].stats["joint"]["fuse_optimizer"]
    assert stats["fused"] == n_trainable
    # grouped by default: a tiny model's gradients all fit one 64 MiB group
    assert stats["update_calls"] == len(_fused_ops(backend.LAST["backward"])) == 1
    assert update_order_violations(backend.LAST["backward"]) == []
    # same kernel, same gradient, same order: identical, not merely close
    _assert_params_equal(ref, ours)
    moved = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), _model(name, **over).parameters()))
    assert moved > 1e-3, "parameters did not train"


def test_hybrid_tier_gate_runs_inside_backward():
    # hybrid: the first-step scratch gate and the periodic re-gate (every 2 steps) happen in the op
    over = {"num_hidden_layers": 1}
    batches = _batches(1, 512, 3)
    kw = dict(tier="hybrid", opt_kwargs={"min_quant_numel": 1024, "gate_every": 2})
    ref, ours = _model("tiny-qwen2", **over), _model("tiny-qwen2", **over)
    o_ref, _ = _train(ref, False, batches, **kw)
    o_ours, _ = _train(ours, True, batches, **kw)
    _assert_params_equal(ref, ours)
    assert o_ours.tier_summary() == o_ref.tier_summary() and o_ours.tier_summary().get("hybrid", 0) > 0
    for p_r, p_o in zip(ref.parameters(), ours.parameters()):
        s_r, s_o = o_ref.state[p_r], o_ours.state[p_o]
        assert float(s_o["step"]) == float(s_r["step"]) == 3.0
        if s_r["tier"] == "hybrid":
            assert s_o["gate_clock"] == 3 and torch.equal(s_o["slot"], s_r["slot"])


def test_param_grad_is_none_and_grad_outputs_dropped():
    m = _model("tiny-llama", num_hidden_layers=1)
    opt = HybridAdamW(m.parameters(), lr=1e-3, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    torch._dynamo.reset()
    c = torch.compile(m, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    ids = _batches(1, 512, 1)[0]
    c(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in m.parameters())
    out = next(n for n in backend.LAST["backward"].graph.nodes if n.op == "output")
    assert all(a is None for a in out.args[0]), "a gradient output survived"
    assert all(fusion.is_fused(p) for p in m.parameters())


# --------------------------------------------------------------------------
# placement: golden checks on the backward graph
# --------------------------------------------------------------------------

def _fused_backward(pipeline, layers=1):
    """One fused step of tiny-qwen2 through ``pipeline``: (model, the backward graph)."""
    m = _model("tiny-qwen2", num_hidden_layers=layers)
    opt = HybridAdamW(m.parameters(), lr=1e-3, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    torch._dynamo.reset()
    c = torch.compile(m, backend="unsloth", options={**OPTS, "pipeline": pipeline, "fuse_optimizer": True})
    ids = _batches(1, 512, 1)[0]
    c(input_ids=ids, labels=ids).loss.backward()
    return m, backend.LAST["backward"]


@pytest.mark.parametrize("pipeline", ["fuse_optimizer", UNGROUPED])
def test_each_update_sits_after_the_last_read_of_its_parameter(pipeline):
    m, bw = _fused_backward(pipeline)
    code = bw.code
    members = _members(bw)
    assert len(members) == len(list(m.parameters()))
    assert len(_fused_ops(bw)) == (1 if pipeline == "fuse_optimizer" else len(members))
    lines = code.splitlines()
    for w, g, name, node in members:
        w = w.name
        # the update comes after every line that reads w (or a view of it); after it, w is only freed
        at = next(i for i, ln in enumerate(lines) if "fused_adamw_step" in ln and re.search(rf"\b{w}\b", ln))
        later = [ln for ln in lines[at + 1:] if re.search(rf"\b{w}\b", ln)]
        assert later == [], f"{w} read after its update: {later}"
    # the o_proj weight: its update follows the matmul reading it in backward, and its gradient
    w, g, _, _ = next(x for x in members if x[2] == "model.layers.0.self_attn.o_proj.weight")
    FileCheck().check(f"torch.ops.aten.t.default({w.name})").check(f"{g.name} = ").check_regex(
        rf"fused_adamw_steps?_\.default\(.*\b{w.name}\b.*\b{g.name}\b.*'model.layers.0.self_attn.o_proj.weight'"
    ).run(code)
    assert update_order_violations(bw) == []


@pytest.mark.parametrize("pipeline", ["fuse_optimizer{group_bytes=4096}", UNGROUPED])
def test_no_gradient_is_kept_alive_past_its_own_update(pipeline):
    # The memory planner frees each fused gradient at its update. Before the fix, a gradient that lazily depends
    # on a parameter updated later (norm and LM-head gradients depend on the embedding through the residual
    # stream) was listed in that later update's `after` arguments, because the graph output still used it while
    # the pass ran: the lowered code kept it to the end of backward (the 1.5B's 445 MiB LM-head gradient on the H100).
    m, bw = _fused_backward(f"fuse_linear_cross_entropy{{chunks=2}},{pipeline}", layers=2)
    order = {n: k for k, n in enumerate(bw.graph.nodes)}
    members = _members(bw)
    assert len(members) == len(list(m.parameters())) and len(_fused_ops(bw)) > 1
    late = [(name, u.name) for _, g, name, node in members for u in g.users if order[u] > order[node]]
    assert late == []
    assert update_order_violations(bw) == []


@pytest.mark.parametrize("grouped", [False, True])
def test_order_checker_catches_an_update_moved_before_a_read(grouped):
    m = _model("tiny-qwen2", num_hidden_layers=1)
    opt = HybridAdamW(m.parameters(), lr=1e-3, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    torch._dynamo.reset()
    c = torch.compile(m, backend="unsloth", options={**OPTS, "pipeline": UNGROUPED, "fuse_optimizer": True})
    ids = _batches(1, 512, 1)[0]
    c(input_ids=ids, labels=ids).loss.backward()
    bw = copy.deepcopy(backend.LAST["backward"])
    assert update_order_violations(bw) == []
    op = next(n for n in _fused_ops(bw) if n.args[2] == "model.layers.0.self_attn.o_proj.weight")
    first_read = next(u for u in bw.graph.nodes if op.args[0] in u.all_input_nodes and u is not op)
    # broken placement: the update right before the first read of the weight (grad made earlier: a dummy)
    with bw.graph.inserting_before(first_read):
        if grouped:
            bad = bw.graph.call_function(torch.ops.unsloth_fx.fused_adamw_steps_.default,
                                         ([op.args[0]], [op.args[0]], [op.args[2]], [op.args[3]], []))
        else:
            bad = bw.graph.call_function(op.target, (op.args[0], op.args[0], op.args[2], op.args[3], []))
    bad.meta["val"] = None
    assert any("o_proj.weight" in v for v in update_order_violations(bw))


# --------------------------------------------------------------------------
# tied weights, frozen parameters, pass contract
# --------------------------------------------------------------------------

def test_tied_embeddings_update_once_after_both_contributions():
    over = {"num_hidden_layers": 1, "tie_word_embeddings": True}
    batches = _batches(1, 512, 4)
    ref, ours = _model("tiny-qwen2", **over), _model("tiny-qwen2", **over)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _train(ref, False, batches)
    _train(ours, True, batches)
    ops = [x[2] for x in _members(backend.LAST["backward"]) if x[2] in (
        "model.embed_tokens.weight", "lm_head.weight")]
    assert len(ops) == 1, ops
    _assert_params_equal(ref, ours)


def test_parameter_frozen_mid_run_is_not_updated():
    batches = _batches(1, 512, 3)
    over = {"num_hidden_layers": 1}

    def freeze(step, model, opt):
        if step == 1:
            model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)

    ref, ours = _model("tiny-llama", **over), _model("tiny-llama", **over)
    _train(ref, False, batches, on_step=freeze)
    frozen_at = {}
    _train(ours, True, batches, on_step=lambda s, m, o: (freeze(s, m, o), frozen_at.setdefault(
        s, m.model.layers[0].mlp.up_proj.weight.detach().clone())))
    _assert_params_equal(ref, ours)
    torch.testing.assert_close(ours.model.layers[0].mlp.up_proj.weight, frozen_at[1], atol=0, rtol=0)


def test_pass_is_idempotent_and_off_by_default():
    m = _model("tiny-llama", num_hidden_layers=1)
    opt = HybridAdamW(m.parameters(), lr=1e-3, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    torch._dynamo.reset()
    c = torch.compile(m, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    ids = _batches(1, 512, 1)[0]
    c(input_ids=ids, labels=ids).loss.backward()
    joint, ctx = backend.LAST["joint"], backend.LAST["ctx"]
    n_ops = len(_fused_ops(joint))
    res = fuse_optimizer(joint, ctx)
    assert res.modified is False and len(_fused_ops(res.graph_module)) == n_ops
    # fuse_optimizer=False: the graph keeps every gradient
    torch._dynamo.reset()
    m2 = _model("tiny-llama", num_hidden_layers=1)
    c2 = torch.compile(m2, backend="unsloth", options=OPTS)
    c2(input_ids=ids, labels=ids).loss.backward()
    assert _fused_ops(backend.LAST["backward"]) == []
    assert all(p.grad is not None for p in m2.parameters())


def test_attach_refuses_stock_adamw_naming_hybridadamw():
    m = _model("tiny-llama", num_hidden_layers=1)
    with pytest.raises(fusion.FusedOptimizerError, match=r"HybridAdamW\(params, state_precision='fp32'\)"):
        fusion.attach(m, torch.optim.AdamW(m.parameters()))


def test_found_by_scan_without_attach():
    batches = _batches(1, 512, 2)
    over = {"num_hidden_layers": 1}
    ref, ours = _model("tiny-llama", **over), _model("tiny-llama", **over)
    _train(ref, False, batches, sched=False)
    torch._dynamo.reset()
    opt = HybridAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, state_precision="fp32",
                      implementation="reference")
    c = torch.compile(ours, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    for ids in batches:
        c(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in ours.parameters())
        opt.step()
    assert fusion.binding_for(next(ours.parameters()), scan=False).implicit
    _assert_params_equal(ref, ours)


def _counting_scans(monkeypatch):
    calls = []
    real = fusion.gc.get_objects

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fusion.gc, "get_objects", counted)
    return calls


def test_bindings_for_scans_the_live_objects_once(monkeypatch):
    held = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    free = [torch.nn.Parameter(torch.randn(4)) for _ in range(5)]
    opt = HybridAdamW(held, lr=1e-3, implementation="reference")
    try:
        calls = _counting_scans(monkeypatch)
        got = fusion.bindings_for(free[:2] + held + free[2:])
        assert len(calls) == 1  # binding_for(scan=True) per parameter scanned once per unbound one: 6 here
        assert got[:2] == [None, None] and got[5:] == [None, None, None]
        assert got[2] is got[3] is got[4] and got[2].optimizer is opt and got[2].implicit
        assert fusion.bindings_for(held) == got[2:5] and len(calls) == 1  # all bound: no scan
    finally:
        fusion.detach(opt)


# --------------------------------------------------------------------------
# accumulation, clipping, checkpoints
# --------------------------------------------------------------------------

def test_accumulation_keeps_grads_then_fuses_the_last_micro_batch():
    batches = _batches(3, 512, 2)  # 2 steps x 3 micro-batches
    over = {"num_hidden_layers": 1}
    ref, ours = _model("tiny-llama", **over), _model("tiny-llama", **over)
    _train(ref, False, batches, accum=3)
    seen = []
    _train(ours, True, batches, accum=3)
    assert "3 micro-batches" in backend.LAST["ctx"].stats["joint"]["fuse_optimizer"]["accumulation"]
    _assert_params_equal(ref, ours)
    # within a step: gradients exist after micro-batches 1 and 2, not after 3
    torch._dynamo.reset()
    m = _model("tiny-llama", **over)
    opt = HybridAdamW(m.parameters(), lr=1e-2, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt, accumulation_steps=3)
    c = torch.compile(m, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    for ids in batches[:3]:
        c(input_ids=ids, labels=ids).loss.backward()
        seen.append(all(p.grad is not None for p in m.parameters()))
    assert seen == [True, True, False] and all(p.grad is None for p in m.parameters())


def test_plain_clip_grad_norm_raises_naming_the_options():
    m = _model("tiny-llama", num_hidden_layers=1)
    opt = HybridAdamW(m.parameters(), lr=1e-3, state_precision="fp32", implementation="reference")
    fusion.attach(m, opt)
    torch._dynamo.reset()
    c = torch.compile(m, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    ids = _batches(1, 512, 1)[0]
    c(input_ids=ids, labels=ids).loss.backward()
    for fn in (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad.clip_grad_norm_):
        with pytest.raises(fusion.FusedOptimizerError) as e:
            fn(m.parameters(), 1.0)
        for option in ("clip='prev_global_norm'", "clip='per_param'", "fuse_optimizer=False"):
            assert option in str(e.value)
    # unfused parameters still clip normally through the wrapped function
    lin = torch.nn.Linear(4, 4)
    lin(torch.randn(2, 4)).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(lin.parameters(), 1e-3) > 1e-3
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in lin.parameters()])) <= 1.01e-3


@pytest.mark.parametrize("clip", ["per_param", "prev_global_norm"])
def test_clip_options_match_their_unfused_definition(clip):
    batches = _batches(1, 512, 4)
    over = {"num_hidden_layers": 1}
    ref, ours = _model("tiny-llama", **over), _model("tiny-llama", **over)
    _, n_ref = _train(ref, False, batches, clip=clip, max_norm=0.5)
    _, n_ours = _train(ours, True, batches, clip=clip, max_norm=0.5)
    # last_grad_norm: what clip_grad_norm_ would have returned (the raw global norm)
    torch.testing.assert_close(torch.stack(n_ours), torch.stack(n_ref), rtol=1e-5, atol=0)
    assert min(float(n) for n in n_ref) > 0.5, "max_norm must bind for the test to mean anything"
    _assert_params_equal(ref, ours, atol=1e-6, rtol=1e-5)  # clip coefficients: fp32 rounding differs
    # and the clipping did something: unclipped training ends elsewhere
    plain = _model("tiny-llama", **over)
    _train(plain, True, batches)
    assert max((p - q).abs().max().item() for p, q in zip(plain.parameters(), ours.parameters())) > 1e-4


def test_checkpoint_save_load_between_steps():
    batches = _batches(1, 512, 4)
    over = {"num_hidden_layers": 1}
    ref = _model("tiny-llama", **over)
    _train(ref, True, batches, sched=False)
    # train 2 steps, checkpoint, then resume in a fresh model + optimizer + compile
    first = _model("tiny-llama", **over)
    opt, _ = _train(first, True, batches[:2], sched=False)
    ckpt = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict()})
    resumed = _model("tiny-llama", seed=5, **over)
    resumed.load_state_dict(ckpt["model"])
    torch._dynamo.reset()
    opt2 = HybridAdamW(resumed.named_parameters(), lr=1e-2, weight_decay=0.1, state_precision="fp32",
                       implementation="reference")
    opt2.load_state_dict(ckpt["opt"])
    fusion.attach(resumed, opt2)
    c = torch.compile(resumed, backend="unsloth", options={**OPTS, "fuse_optimizer": True})
    for ids in batches[2:]:
        c(input_ids=ids, labels=ids).loss.backward()
        opt2.step()
    assert all(float(opt2.state[p]["step"]) == 4.0 for p in resumed.parameters())
    _assert_params_equal(ref, resumed)


def test_load_state_dict_into_a_live_fused_optimizer_is_seen_by_the_graph():
    # the op looks the state up when it runs, so a load between steps takes effect
    batches = _batches(1, 512, 3)
    over = {"num_hidden_layers": 1}
    m = _model("tiny-llama", **over)
    saved = {}

    def snap(step, model, opt):
        if step == 0:
            saved["m"], saved["o"] = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        if step == 1:  # roll back to after step 1, then step 3 must redo step 2
            model.load_state_dict(saved["m"])
            opt.load_state_dict(saved["o"])

    _train(m, True, batches[:1] + batches[1:2] + batches[1:2], sched=False, on_step=snap)
    ref = _model("tiny-llama", **over)
    _train(ref, True, batches[:2], sched=False)
    _assert_params_equal(ref, m)


# --------------------------------------------------------------------------
# Inductor
# --------------------------------------------------------------------------

def _update_lines_out_of_order(code: str) -> list[str]:
    """Lines of Inductor's generated code that use a parameter after the line that updates it
    (one-parameter or grouped update op)."""
    lines = code.splitlines()
    # the body of `def call(...)`, where kernels run (the benchmark harness after it names inputs too)
    lines = lines[next((k for k, x in enumerate(lines) if x.lstrip().startswith("def call(")), 0):]
    lines = lines[:next((k for k, x in enumerate(lines[1:], 1) if x and not x[0].isspace()), len(lines))]
    bad = []
    for k, ln in enumerate(lines):
        m = re.search(r"fused_adamw_step_\.default\((\w+), .*'([\w.]+)', \d+", ln)
        g = re.search(r"fused_adamw_steps_\.default\(\[([^\]]*)\], \[[^\]]*\], \[([^\]]*)\]", ln)
        if m is not None:
            pairs = [(m.group(1), m.group(2))]
        elif g is not None:
            pairs = list(zip([x.strip() for x in g.group(1).split(",")],
                             [x.strip().strip("'") for x in g.group(2).split(",")]))
        else:
            continue
        for w, name in pairs:
            bad += [f"{name}: {x.strip()}" for x in lines[k + 1:]
                    if re.search(rf"\b{w}\b", x) and not re.match(rf"\s*del .*\b{w}\b", x)]
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["fuse_optimizer", UNGROUPED])
def test_inductor_lowering_runs_the_in_place_update(pipeline):
    # Unfused Inductor training is deterministic on CPU (two runs agree bit for bit), so fused must
    # equal it exactly. Before the `after` argument it did not: norm.weight's update ran before the
    # kernel reading it, every gradient below the final norm was off by ~1%.
    batches = _batches(1, 512, 3)
    over = {"num_hidden_layers": 1}
    ref, ours = _model("tiny-llama", **over), _model("tiny-llama", **over)
    _train(ref, False, batches, lower="inductor")
    OPTS["pipeline"] = pipeline
    try:
        _, codes = _compat.inductor_output_code(_train, ours, True, batches, lower="inductor")
    finally:
        OPTS["pipeline"] = "fuse_optimizer"
    n = len(list(ours.parameters()))
    assert len(_members(backend.LAST["backward"])) == n
    # the lowered backward: every update after the last use of its parameter
    lowered = [c for c in codes if "fused_adamw_step" in c]
    assert len(lowered) == 1
    if pipeline == UNGROUPED:
        assert lowered[0].count("fused_adamw_step_.default(") == n
    else:
        assert lowered[0].count("fused_adamw_steps_.default(") == 1
    assert _update_lines_out_of_order(lowered[0]) == []
    _assert_params_equal(ref, ours)


def test_lowered_code_checker_catches_a_read_after_the_update():
    code = ("    torch.ops.unsloth_fx.fused_adamw_step_.default(primals_13, buf6, 'model.norm.weight', 1, [buf5])\n"
            "    cpp_fused_mul_2(buf11, buf3, primals_13, rsqrt_2, buf10)\n"
            "    del primals_13\n")
    assert _update_lines_out_of_order(code) == ["model.norm.weight: cpp_fused_mul_2(buf11, buf3, primals_13, "
                                                "rsqrt_2, buf10)"]
    assert _update_lines_out_of_order(code.replace("primals_13, rsqrt", "buf4, rsqrt")) == []
    grouped = ("    torch.ops.unsloth_fx.fused_adamw_steps_.default([primals_2, primals_13], [buf1, buf6], "
               "['model.a.weight', 'model.norm.weight'], [0, 1], [buf5])\n"
               "    cpp_fused_mul_2(buf11, buf3, primals_13, rsqrt_2, buf10)\n"
               "    del primals_13\n")
    assert _update_lines_out_of_order(grouped) == ["model.norm.weight: cpp_fused_mul_2(buf11, buf3, primals_13, "
                                                   "rsqrt_2, buf10)"]
    assert _update_lines_out_of_order(grouped.replace("primals_13, rsqrt", "buf4, rsqrt")) == []
