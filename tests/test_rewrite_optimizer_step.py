"""`rewrite_optimizer_step`: a compiled stock Adam/AdamW step runs our AdamW kernel.

Specification: ``torch.compile(opt.step, backend="unsloth", options={"fuse_optimizer": True})``
of a stock ``torch.optim.AdamW`` (foreach or single-tensor) gives, step after step,
the parameters of an unfused ``HybridAdamW`` at the tier of the parameters'
dtype (fp32 -> fp32, bf16 -> bf16), bit for bit (same kernel: the Triton kernel
in the interpreter here). Anything else is left to torch and the stats say why.
``fused=True`` never reaches a backend in torch 2.11-2.14 (Dynamo runs
``_fused_adam`` eagerly).
"""

import pytest
import torch
from torch.testing import FileCheck

import unsloth_fx.backend as backend
from unsloth_fx.optim import HybridAdamW
from unsloth_fx.options import Options
from unsloth_fx.pass_base import PassContext
from unsloth_fx.passes.rewrite_optimizer_step import rewrite_optimizer_step

OPTS = {"lower": "eager", "pipeline": "rewrite_optimizer_step", "fuse_optimizer": True}
STEPS = 3


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)


def _train(model, opt, step, dtype):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(4, 8, generator=g).to(dtype)
        model(x).float().square().mean().backward()
        step()
        opt.zero_grad()


def _hybrid(dtype, tier):
    m = _model(dtype)
    opt = HybridAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, state_precision=tier)
    _train(m, opt, opt.step, dtype)
    return m


def _compiled_stock(dtype, cls=torch.optim.AdamW, options=OPTS, **kw):
    m = _model(dtype)
    opt = cls(m.parameters(), lr=1e-2, **{"weight_decay": 0.1, **kw})
    torch._dynamo.reset()
    backend.LAST.clear()
    step = torch.compile(opt.step, backend="unsloth", options=options)
    _train(m, opt, step, dtype)
    return m, backend.LAST.get("ctx")


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype,tier,impl", [(torch.float32, "fp32", {"foreach": True}),
                                             (torch.float32, "fp32", {"foreach": False}),
                                             (torch.bfloat16, "bf16", {"foreach": True})])
def test_compiled_adamw_step_equals_hybrid_adamw_at_the_tier(dtype, tier, impl):
    ref = _hybrid(dtype, tier)
    ours, ctx = _compiled_stock(dtype, **impl)
    st = ctx.stats["pre_grad"]["rewrite_optimizer_step"]
    assert st["modified"] and st["rewritten"] == 4 and st["tiers"] == [tier]
    assert st["implementation"] == ["foreach" if impl["foreach"] else "single-tensor"]
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=lambda m: f"{n}: {m}")
    assert (ours[0].weight - _model(dtype)[0].weight).abs().max() > 1e-3, "did not train"
    # control: without the rewrite, torch's own AdamW differs (rounding order; bf16 rounds to nearest)
    stock, _ = _compiled_stock(dtype, options={**OPTS, "fuse_optimizer": False}, **impl)
    assert not _same(stock, ref)


def test_graph_golden_deterministic_and_idempotent():
    # the pass runs inside a plain backend (while Dynamo still holds the graph's real inputs)
    m = _model(torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    ctx = PassContext(options=Options.from_user({"fuse_optimizer": True}), stage="pre_grad")
    seen = {}

    def backend_fn(gm, example_inputs):
        seen["before"] = gm.code
        res = rewrite_optimizer_step(gm, ctx)
        seen["res"], seen["code"] = res, res.graph_module.code
        seen["again"] = rewrite_optimizer_step(res.graph_module, ctx)
        return res.graph_module.forward

    torch._dynamo.reset()
    m(torch.randn(4, 8)).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    torch.compile(opt.step, backend=backend_fn)()
    res, code = seen["res"], seen["code"]
    assert "_foreach_" in seen["before"]
    assert res.modified and res.stats["rewritten"] == 4
    # one call: params, grads, exp_avgs, exp_avg_sqs, steps, each parameter's 1-based index, optimizer slot
    FileCheck().check_count("torch.ops.unsloth_fx.stock_adamw_step_.default([", 1, exactly=True).check(
        "], [1, 2, 3, 4], ").run(code)
    assert "_foreach_" not in code
    assert seen["again"].modified is False and seen["again"].graph_module.code == code
    # the rewritten graph ran and updated the optimizer's own tensors in place
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in m.parameters())


@pytest.mark.parametrize("cls,kw,reason", [
    (torch.optim.AdamW, {"amsgrad": True}, "amsgrad=True"),
    (torch.optim.AdamW, {"maximize": True}, "maximize=True"),
    (torch.optim.Adam, {"weight_decay": 0.1}, "L2 decay"),
    (torch.optim.SGD, {"momentum": 0.9}, "no live torch.optim.Adam/AdamW"),
])
def test_what_is_not_adamw_is_left_to_torch(cls, kw, reason):
    ref = _model(torch.float32)
    ref_opt = cls(ref.parameters(), lr=1e-2, **{"weight_decay": 0.1, **kw})
    _train(ref, ref_opt, ref_opt.step, torch.float32)  # eager torch
    ours, ctx = _compiled_stock(torch.float32, cls=cls, **kw)
    st = ctx.stats["pre_grad"]["rewrite_optimizer_step"]
    assert st["modified"] is False and reason in st["left"], st
    # left alone: torch's own (compiled) update, close to eager torch
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


def test_adam_without_weight_decay_is_adamw_and_is_rewritten():
    ref = _model(torch.float32)
    h = HybridAdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, state_precision="fp32")
    _train(ref, h, h.step, torch.float32)
    ours, ctx = _compiled_stock(torch.float32, cls=torch.optim.Adam, weight_decay=0.0, foreach=True)
    assert ctx.stats["pre_grad"]["rewrite_optimizer_step"]["rewritten"] == 4
    assert _same(ours, ref)


def test_fused_adamw_never_reaches_the_backend():
    # torch.optim.adam._fused_adam is wrapped in torch.compiler.disable by Dynamo ("don't trace into
    # fused optimizer"): the step graph-breaks and torch's fused kernel runs eagerly, no graph to rewrite
    ref = _model(torch.float32)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    _train(ref, ref_opt, ref_opt.step, torch.float32)
    ours, ctx = _compiled_stock(torch.float32, fused=True)
    assert ctx is None or "rewrite_optimizer_step" not in ctx.stats.get("pre_grad", {}) or \
        ctx.stats["pre_grad"]["rewrite_optimizer_step"]["modified"] is False
    assert _same(ours, ref)


def test_off_without_fuse_optimizer():
    _, ctx = _compiled_stock(torch.float32, options={**OPTS, "fuse_optimizer": False}, foreach=True)
    assert ctx.stats["pre_grad"]["rewrite_optimizer_step"] == {"modified": False, "ms": pytest.approx(
        ctx.stats["pre_grad"]["rewrite_optimizer_step"]["ms"]), "status": "off (fuse_optimizer=False)"}


@pytest.mark.slow
def test_inductor_lowering_of_the_rewritten_step():
    # functionalization turns the in-place list op into auto_functionalized; Inductor re-inplaces it
    ref = _hybrid(torch.float32, "fp32")
    ours, ctx = _compiled_stock(torch.float32, options={**OPTS, "lower": "inductor"}, foreach=True)
    assert ctx.stats["pre_grad"]["rewrite_optimizer_step"]["rewritten"] == 4
    assert _same(ours, ref)
