"""Pass `rewrite_optimizer_step`: a compiled stock Adam/AdamW step -> our AdamW kernel.

Pre-grad stage, on with ``fuse_optimizer=True``. When the Dynamo graph is one
``torch.optim.Adam`` / ``torch.optim.AdamW`` ``step()`` (``torch.compile(opt.step,
backend="unsloth", options={"fuse_optimizer": True})``, or a function that only
calls ``opt.step()``), its whole body is replaced by::

    torch.ops.unsloth_fx.stock_adamw_step_([params], [grads], [exp_avgs], [exp_avg_sqs], [steps], <slot>)

which updates each parameter with ``unsloth_fx.runtime.adamw`` (the kernel
``HybridAdamW`` runs), on the optimizer's own state tensors: fp32 tier for fp32
parameters and state, bf16 tier (stochastic rounding of weight and moments)
for bf16 parameters and state. Numerics are those of an unfused
``HybridAdamW(state_precision=<tier>)`` with the same hyper-parameters and
``seed=0`` (same per-parameter seed, same non-finite skip), not those of
torch's AdamW (different rounding order, round-to-nearest bf16).

Recognition is by meaning, not by op pattern: the graph's tensors must be
exactly some parameters of one live Adam/AdamW, their gradients and their
``step`` / ``exp_avg`` / ``exp_avg_sq`` state, every op must come from
``torch/optim``, and the graph returns nothing computed. The foreach and the
single-tensor (for-loop) implementations both qualify. Left unchanged and
reported in the stats (``left``, with the reason): ``fused=True`` never reaches
a backend (Dynamo runs ``torch.optim.adam._fused_adam`` eagerly behind
``torch.compiler.disable``: "don't trace into fused optimizer", torch
2.11-2.14), ``amsgrad``, ``maximize``, ``differentiable``, ``Adam`` with
``weight_decay > 0`` (L2, not decoupled), parameters whose dtype is not
fp32/bf16 or whose state dtype differs from it, other optimizers, and graphs
with anything besides the step.

Hyper-parameters (lr, betas, eps, weight_decay) are read from the parameter
group when the op runs, so schedulers that write ``group["lr"]`` work (Dynamo
may still recompile on a float lr, as for the stock step).
"""

from __future__ import annotations

import gc
import operator
import warnings
import weakref
from typing import Any

import torch
import torch.fx
from torch import Tensor

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx

OP_NAME = "unsloth_fx.stock_adamw_step_"
TIER_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# slot -> weakref to the optimizer; the rewritten graph names its optimizer by slot
_OPTIMIZERS: list[Any] = []


def _slot_for(opt) -> int:
    for k, ref in enumerate(_OPTIMIZERS):
        if ref() is opt:
            return k
    _OPTIMIZERS.append(weakref.ref(opt))
    return len(_OPTIMIZERS) - 1


def _index_of(opt, p: Tensor) -> int:
    """1-based position of ``p`` over all groups: HybridAdamW's key for its Philox seed."""
    return next(k for k, q in enumerate((q for g in opt.param_groups for q in g["params"]), start=1) if q is p)


@torch.library.custom_op(OP_NAME.replace(".", "::"), mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def stock_adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], steps: list[Tensor], index: list[int], slot: int) -> None:
    """One AdamW step of the stock optimizer in ``slot`` over these parameters, in place,
    with ``unsloth_fx.runtime.adamw``; what ``HybridAdamW._step_param`` does (check_finite on).
    ``index``: each parameter's 1-based position over the optimizer's groups (the tensors may be
    functionalization's copies, so identity cannot find the group)."""
    from unsloth_fx.runtime import adamw as kernels

    opt = _OPTIMIZERS[slot]()
    if opt is None:
        raise RuntimeError("the compiled optimizer step was rewritten for an optimizer that no longer exists; "
                           "recompile (torch._dynamo.reset())")
    group_at = [g for g in opt.param_groups for _ in g["params"]]
    for p, g, m, v, st, k in zip(params, grads, exp_avgs, exp_avg_sqs, steps, index):
        grp = group_at[k - 1]
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        found_inf = torch.logical_not(torch.isfinite(norm)).to(torch.float32)
        if st.device != p.device:  # torch keeps non-capturable step counts on the CPU
            st.add_((1.0 - found_inf).to(st.device))
        else:
            st.add_(1.0 - found_inf)
        kernels.adamw_step_fp32(p, g, m.view(-1), v.view(-1), lr=grp["lr"], betas=grp["betas"], eps=grp["eps"],
                                weight_decay=grp["weight_decay"], step=st, found_inf=found_inf,
                                seed=(k * 7919 + 1) & 0x7FFFFFFF, stochastic_rounding=True)  # HybridAdamW, seed=0


@stock_adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, index, slot):
    return None


def _live_adams() -> list[Any]:
    with warnings.catch_warnings():  # isinstance on every live object trips deprecated module attributes
        warnings.simplefilter("ignore")
        out = []
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.optim.Adam):  # AdamW is a subclass in torch >= 2.6
                    out.append(o)
            except ReferenceError:  # dead weakref proxies
                pass
        return out


def _tensor_of(gm: torch.fx.GraphModule, n: torch.fx.Node) -> Tensor | None:
    if n.op == "get_attr":
        try:
            t = operator.attrgetter(n.target)(gm)
        except AttributeError:
            return None
        return t if isinstance(t, Tensor) else None
    if n.op == "placeholder":
        return _compat.placeholder_example(n)
    return None


def _group_reason(opt) -> str | None:
    """None when every group's settings are our kernel's AdamW; else the reason, for the stats."""
    for g in opt.param_groups:
        for flag in ("amsgrad", "maximize", "differentiable", "fused"):
            if g.get(flag):
                return f"{flag}=True"
        if not g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)) and g["weight_decay"] != 0:
            return "Adam with weight_decay > 0 (L2 decay; our kernel decouples it like AdamW)"
    return None


def _why_not(opt, params: list[Tensor]) -> str | None:
    """None when every parameter can take our kernel (dtype, state layout); else the reason."""
    for p in params:
        if p.dtype not in TIER_OF_DTYPE:
            return f"parameter dtype {p.dtype} (fp32 and bf16 only)"
        st = opt.state.get(p, {})
        if not all(isinstance(st.get(k), Tensor) for k in ("step", "exp_avg", "exp_avg_sq")):
            return "optimizer state not initialised"
        if st["exp_avg"].dtype != p.dtype or st["exp_avg_sq"].dtype != p.dtype:
            return f"state dtype {st['exp_avg'].dtype} differs from parameter dtype {p.dtype}"
        if not (st["exp_avg"].is_contiguous() and st["exp_avg_sq"].is_contiguous()):
            return "non-contiguous moments"
    return None


def _recognise(gm: torch.fx.GraphModule) -> tuple[Any, dict, str | None]:
    """(optimizer, {param index in the graph: (param node, grad node, m node, v node, step node)}, reason).
    The optimizer is None when the graph is not an Adam step (reason says why)."""
    nodes = list(gm.graph.nodes)
    tensors = {n: _tensor_of(gm, n) for n in nodes if n.op in ("get_attr", "placeholder")}
    ids = {id(t): n for n, t in tensors.items() if t is not None}
    adams = [o for o in _live_adams() if any(id(q) in ids for g in o.param_groups for q in g["params"])]
    if not adams:
        return None, {}, "no live torch.optim.Adam/AdamW holds the graph's tensors"
    if len(adams) > 1:
        return None, {}, f"{len(adams)} optimizers share the graph's tensors"
    opt = adams[0]
    why = _group_reason(opt)
    if why is not None:  # before matching tensors: e.g. amsgrad adds max_exp_avg_sq inputs
        return None, {}, f"{type(opt).__name__}: {why}"
    owned: dict = {}  # node -> (param, role)
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            for role, t in (("param", p), ("grad", p.grad), *((k, st.get(k)) for k in ("exp_avg", "exp_avg_sq",
                                                                                     "step"))):
                if isinstance(t, Tensor) and id(t) in ids:
                    owned[ids[id(t)]] = (p, role)
    stray = [n.name for n in tensors if n not in owned and n.users]
    if stray:
        return None, {}, f"graph inputs that are not the optimizer's: {stray[:3]}"
    outside = [n.name for n in nodes if n.op == "call_function" and "torch/optim/" not in
               (n.meta.get("stack_trace") or "")]
    if outside:
        return None, {}, f"ops outside torch/optim (the graph is more than opt.step()): {outside[:3]}"
    out = next(n for n in reversed(nodes) if n.op == "output")
    returned: list = []
    torch.fx.node.map_arg(out.args, returned.append)
    if any(r.op not in ("placeholder", "get_attr") for r in returned):
        return None, {}, "the graph returns computed values"
    per: dict = {}
    for n, (p, role) in owned.items():
        per.setdefault(id(p), {"p": p})[role] = n
    groups = {}
    order = [id(q) for g in opt.param_groups for q in g["params"]]
    for pid in sorted(per, key=order.index):
        d = per[pid]
        if not all(k in d for k in ("param", "grad", "exp_avg", "exp_avg_sq", "step")):
            return None, {}, f"parameter of shape {tuple(d['p'].shape)} lacks a graph input for " \
                             f"{[k for k in ('param', 'grad', 'exp_avg', 'exp_avg_sq', 'step') if k not in d]}"
        groups[pid] = d
    return opt, groups, None


@graph_pass(name="rewrite_optimizer_step", stage="pre_grad")
def rewrite_optimizer_step(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace a compiled stock Adam/AdamW step by one call of our AdamW kernel per parameter."""
    if not ctx.options.fuse_optimizer:
        return PassResult(gm, False, {"status": "off (fuse_optimizer=False)"})
    graph = gm.graph
    if any(n.op == "call_function" and n.target is torch.ops.unsloth_fx.stock_adamw_step_.default
           for n in graph.nodes):
        return PassResult(gm, False, {"status": "already rewritten"})
    if not any("torch/optim/" in (n.meta.get("stack_trace") or "") for n in graph.nodes):
        return PassResult(gm, False, {"status": "not an optimizer step"})
    opt, per, why = _recognise(gm)
    if opt is None:
        return PassResult(gm, False, {"rewritten": 0, "left": why})
    params = [d["p"] for d in per.values()]
    why = _why_not(opt, params)
    if why is not None:
        return PassResult(gm, False, {"rewritten": 0, "left": f"{type(opt).__name__}: {why}",
                                      "optimizer": type(opt).__name__})
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    keep = {d[k] for d in per.values() for k in ("param", "grad", "exp_avg", "exp_avg_sq", "step")}
    for n in reversed(list(graph.nodes)):  # users first: every computed value goes
        if n.op in ("call_function", "call_method", "call_module"):
            graph.erase_node(n)
    lists = [[d[k] for d in per.values()] for k in ("param", "grad", "exp_avg", "exp_avg_sq", "step")]
    with graph.inserting_before(out):
        node = graph.call_function(torch.ops.unsloth_fx.stock_adamw_step_.default,
                                   (*lists, [_index_of(opt, p) for p in params], _slot_for(opt)))
    node.meta["val"] = None
    node.meta["example_value"] = None
    ufx(node).notes["rewritten_optimizer"] = type(opt).__name__
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users and n not in keep:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    tiers = sorted({TIER_OF_DTYPE[p.dtype] for p in params})
    return PassResult(gm, True, {"rewritten": len(params), "optimizer": type(opt).__name__, "tiers": tiers,
                                 "implementation": sorted({"foreach" if g.get("foreach") else "single-tensor"
                                                           for g in opt.param_groups})})
