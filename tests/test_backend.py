"""The `unsloth` backend end to end: numerics against eager, discovery, dumps,
custom passes and the verifier."""

import json
import re
import os
import subprocess
import sys

import pytest
import torch
import torch.fx
from torch.testing import FileCheck

import unsloth_fx.backend as backend
from unsloth_fx.pass_base import PassResult, graph_pass, ufx
from unsloth_fx.pipeline import PassFailure

from _support import loss_and_grads, twin_models

TINY = ["tiny-qwen2", "tiny-llama", "tiny-deepseek-v3"]


def _pair(name):
    ref, ours = twin_models(name)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    return ref, ours, ids


def _assert_same_training_step(name, options, atol=2e-5, rtol=2e-4):
    ref, ours, ids = _pair(name)
    compiled = torch.compile(ours, backend="unsloth", options=options)
    l_ref, g_ref = loss_and_grads(ref, ids)
    l_ours, g_ours = loss_and_grads(compiled, ids)
    torch.testing.assert_close(l_ours, l_ref, atol=atol, rtol=rtol)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", TINY)
def test_compiled_step_matches_eager_loss_and_every_gradient(name):
    torch._dynamo.reset()
    _assert_same_training_step(name, {"lower": "eager"})


@pytest.mark.slow
def test_inductor_lowering_matches_eager():
    torch._dynamo.reset()
    _assert_same_training_step("tiny-qwen2", {"lower": "inductor"}, atol=1e-4, rtol=1e-3)


def test_negative_control_a_different_model_fails_the_comparison():
    # The comparison above must be able to fail: perturb one weight and it does.
    ref, ours, ids = _pair("tiny-qwen2")
    with torch.no_grad():
        next(ours.parameters()).add_(1e-2)
    l_ref, _ = loss_and_grads(ref, ids)
    l_ours, _ = loss_and_grads(torch.compile(ours, backend="unsloth", options={"lower": "eager"}), ids)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(l_ours, l_ref, atol=2e-5, rtol=2e-4)


def test_parameters_are_named_on_the_joint_graph():
    torch._dynamo.reset()
    ref, ours, ids = _pair("tiny-llama")
    torch.compile(ours, backend="unsloth", options={"lower": "eager"})(input_ids=ids, labels=ids).loss.backward()
    names = {p.name for p in backend.LAST["ctx"].params.values() if not p.is_buffer}
    assert {p.name for p in backend.LAST["ctx"].params.values() if p.is_buffer} == {"model.rotary_emb.inv_freq"}
    assert names == {n for n, _ in ours.named_parameters()}
    joint = backend.LAST["joint"]
    marked = {ufx(n).param for n in joint.graph.nodes if n.op == "placeholder" and n.meta.get("ufx")}
    assert "lm_head.weight" in marked and "model.embed_tokens.weight" in marked


@pytest.mark.parametrize("preimport", [False, True])
def test_backend_is_found_through_the_entry_point_in_a_fresh_process(preimport):
    code = (
        ("import unsloth_fx.backend\n" if preimport else "")
        + "import sys, torch\n"
        + "assert %s ('unsloth_fx' in sys.modules)\n" % ("" if preimport else "not")
        + "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))\n"
        + "f = torch.compile(m, backend='unsloth', options={'lower': 'eager'})\n"
        + "x = torch.randn(4, 8)\n"
        + "f(x).sum().backward()\n"
        + "import unsloth_fx.backend as b\n"
        + "print('stages', sorted(b.LAST['ctx'].stats))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_FX_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stages ['backward', 'forward', 'joint', 'pre_grad']" in out.stdout


def test_inference_graphs_go_through_the_inference_stage():
    torch._dynamo.reset()
    m = torch.nn.Linear(8, 4)
    f = torch.compile(m, backend="unsloth", options={"lower": "eager"})
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x))
    assert "inference" in backend.LAST and "joint" not in backend.LAST["ctx"].stats


@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_compiled_autograd_graphs_are_lowered_without_training_passes(lower):
    from unsloth_fx import _compat

    torch._dynamo.reset()
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8)
    opts = {"lower": lower}
    loss = torch.compile(m, backend="unsloth", options=opts)(x).sum()
    before = len(backend.COMPILED_AUTOGRAD_GRAPHS)
    with _compat.enable_compiled_autograd(torch.compile(backend="unsloth", options=opts)):
        loss.backward()
    assert len(backend.COMPILED_AUTOGRAD_GRAPHS) == before + 1
    ref(x).sum().backward()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@graph_pass(name="tag_matmuls", stage="joint")
def tag_matmuls(gm, ctx):
    """Example user pass: annotate every matmul (idempotent)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            if ufx(n).notes.get("tagged") is not True:
                ufx(n).notes["tagged"] = True
                changed = True
    return PassResult(gm, changed, {"tagged": sum(1 for n in gm.graph.nodes if n.meta.get("ufx") and n.meta["ufx"].notes.get("tagged"))})


def test_custom_pass_runs_and_appears_in_the_dump(tmp_path):
    torch._dynamo.reset()
    ref, ours, ids = _pair("tiny-qwen2")
    f = torch.compile(ours, backend="unsloth", options={"lower": "eager", "dump": str(tmp_path), "pipeline": "default,+tag_matmuls"})
    f(input_ids=ids, labels=ids).loss.backward()
    (g,) = [p for p in tmp_path.iterdir() if p.name.startswith("graph_")]
    files = {p.name for p in g.iterdir()}
    for must in ["pipeline.txt", "forward.py", "backward.py", "pass_stats.json", "000_pre_grad_input.py"]:
        assert must in files, sorted(files)
    # the joint stage's input comes after the pre_grad passes (numbered in pipeline order)
    assert any(f.endswith("_joint_input.py") for f in files), sorted(files)
    (mine,) = [f for f in files if f.endswith("_joint_tag_matmuls.py")]
    assert mine.replace(".py", ".diff") in files
    text = (g / mine).read_text()
    assert text.startswith("# built by tag_matmuls (modified=True, tagged=")
    FileCheck().check("def forward").check("f32[").check("torch.ops.aten.mm.default").run(text)
    stats = json.loads((g / "pass_stats.json").read_text())
    assert stats["joint"]["tag_matmuls"]["modified"] is True and stats["joint"]["tag_matmuls"]["tagged"] > 0
    assert "default,+tag_matmuls" in (g / "pipeline.txt").read_text()


def test_custom_pass_is_idempotent():
    torch._dynamo.reset()
    _, ours, ids = _pair("tiny-qwen2")
    torch.compile(ours, backend="unsloth", options={"lower": "eager", "pipeline": "tag_matmuls"})(input_ids=ids, labels=ids).loss.backward()
    joint = backend.LAST["joint"]
    assert tag_matmuls(joint, backend.LAST["ctx"]).modified is False


@graph_pass(name="break_graph_for_test", stage="joint")
def break_graph_for_test(gm, ctx):
    """Deliberately broken: adds a node with no fake value."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.ops.aten.neg.default, (x,), name="orphan_neg")
    gm.recompile()
    return PassResult(gm, True)


@graph_pass(name="mutate_for_test", stage="forward")
def mutate_for_test(gm, ctx):
    """Deliberately broken: turns the graph non-functional."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            n.target = torch.ops.aten.relu_.default
            n.args = (n.args[0],)
            break
    gm.recompile()
    return PassResult(gm, True)


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("plan_memory,break_graph_for_test", r"pass 'break_graph_for_test' broke the joint graph: node orphan_neg .* has no meta\['val'\]: .*\[passes before it: plan_memory\]"),
        ("mutate_for_test", r"pass 'mutate_for_test' broke the forward graph: node .* calls the mutating op aten.relu_.default"),
    ],
)
def test_verifier_names_the_pass_that_broke_the_graph(pipeline, message):
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    f = torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": pipeline, "verify": True})
    with pytest.raises(Exception) as e:
        f(torch.randn(4, 8)).sum().backward()
    failures = [x for x in _causes(e.value) if isinstance(x, PassFailure)]
    assert failures, str(e.value)
    assert re.search(message, str(failures[0])), str(failures[0])


def _causes(err):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


_SNAPSHOTS: dict = {}


@graph_pass(name="snapshot_forward_for_test", stage="forward")
def snapshot_forward_for_test(gm, ctx):
    _SNAPSHOTS["forward"] = gm.code
    return PassResult(gm, False)


@graph_pass(name="snapshot_backward_for_test", stage="backward")
def snapshot_backward_for_test(gm, ctx):
    _SNAPSHOTS["backward"] = gm.code
    return PassResult(gm, False)


def test_inductor_lowering_leaves_the_pipelines_graphs_as_the_passes_left_them():
    """Inductor's post-grad passes rewrite the graph they lower in place, and only on an FX-graph-cache miss
    (on CPU ``add(acc, mm)`` becomes ``addmm``): LAST["backward"] and the checkers that read it saw a
    different graph on a cold cache (a clean CI machine) than on a warm one. The backend lowers a copy."""
    import torch._inductor.config as iconfig

    def f(x, w1, w2, b):
        h = x @ w1 + b
        return (h @ w2 + x @ w2).relu().sum()

    args = [torch.randn(8, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True),
            torch.randn(16, 16, requires_grad=True), torch.randn(16, requires_grad=True)]
    torch._dynamo.reset()
    _SNAPSHOTS.clear()
    opts = {"lower": "inductor", "pipeline": "default,+snapshot_forward_for_test,+snapshot_backward_for_test"}
    with iconfig.patch(fx_graph_cache=False):  # a miss every time: Inductor runs its post-grad passes
        torch.compile(f, backend="unsloth", options=opts)(*args).backward()
    assert set(_SNAPSHOTS) == {"forward", "backward"}
    for k in ("forward", "backward"):
        assert backend.LAST[k].code == _SNAPSHOTS[k], k


def test_long_compile_work_is_announced_on_stderr(capsys):
    # options.progress: each pass, the AOT trace, the partition and each lowering that takes at least
    # this many seconds gets one line on stderr (a large model's first step compiles for minutes);
    # 0 announces everything, a negative value nothing
    from unsloth_fx.options import OptionError, Options

    def f(w, x):
        return torch.relu(x @ w).sum()

    w, x = torch.randn(8, 8, requires_grad=True), torch.randn(4, 8)
    for progress in (0, -1):
        torch._dynamo.reset()
        capsys.readouterr()
        torch.compile(f, backend="unsloth", options={"lower": "eager", "progress": progress})(w, x).backward()
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("unsloth-fx: graph ")]
        if progress < 0:
            assert lines == [], err
            continue
        text = "\n".join(lines)
        FileCheck().check("joint trace (").check("joint pass plan_memory: ").check("partition: ").check(
            "forward lowered (eager): ").check("backward lowered (eager): ").run(text)
        assert all(re.search(r": \d+\.\d s$", ln) for ln in lines), lines
    assert Options.from_user({}).progress == 5.0
    with pytest.raises(OptionError, match="progress='soon'"):
        Options.from_user({"progress": "soon"})
