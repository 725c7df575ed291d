"""Runtime side of ``fuse_optimizer``: optimizer updates that run inside backward.

``attach(model_or_params, optimizer, clip=..., max_norm=..., accumulation_steps=...)``
binds a :class:`~unsloth_fx.optim.HybridAdamW` to the parameters it holds. A model
compiled with ``options={"fuse_optimizer": True}`` then calls
``torch.ops.unsloth_fx.fused_adamw_step_(param, grad, name, slot, after)`` in its backward
graph for each bound parameter, right after the parameter's gradient is final;
the graph returns no gradient for it, so ``param.grad`` stays ``None``.
Without ``attach``, the pass looks for a live ``HybridAdamW`` holding the
graph's parameters (a garbage-collector scan, once per compile) and binds it
with the defaults.

Why an opaque op (the parameter, its gradient, its name, a slot number) and not
the state tensors as graph constants: Inductor inlines 0-d ``get_attr``
constants (lr, step, betas) as Python scalars, which would freeze a schedule;
``load_state_dict`` replaces the state tensors the graph would have captured;
and the hybrid tier's first-step gate needs a scratch step plus a host-side
re-gate. Looking the state up at run time keeps every one of these exactly as
in ``HybridAdamW.step()``: the op calls :meth:`HybridAdamW.step_param`, the
same code the unfused step runs, so numerics are identical by construction.

Semantics (see docs/fuse_optimizer.md):

* ``optimizer.step()`` updates nothing that was updated in backward (its
  gradient is ``None``); step counts advance inside the op, as in the unfused
  step; LR schedulers work unchanged (the op reads the group's lr when it runs).
* Gradient accumulation (``accumulation_steps=N > 1``): micro-batches 1..N-1
  accumulate into ``param.grad`` exactly as autograd would (so gradients *are*
  kept during accumulation); the N-th backward adds its contribution, updates
  and frees ``param.grad``.
* Clipping: ``torch.nn.utils.clip_grad_norm_`` on fused parameters raises
  :class:`FusedOptimizerError`. ``clip="per_param"`` clips each gradient to
  ``max_norm`` by its own norm; ``clip="prev_global_norm"`` scales every
  gradient by ``min(1, max_norm / (norm of the previous step + 1e-6))`` (the
  first step is unclipped). The global norm of each step's raw gradients is
  available afterwards as :func:`last_grad_norm`.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from unsloth_fx import _compat

__all__ = ["attach", "detach", "binding_for", "bindings_for", "last_grad_norm", "is_fused", "FusedOptimizerError",
           "CLIP_MODES"]

CLIP_MODES = (None, "per_param", "prev_global_norm")
_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class FusedOptimizerError(RuntimeError):
    """A request that cannot hold while optimizer updates run inside backward."""


@dataclass(eq=False)
class Binding:
    """One optimizer bound for in-backward updates, with its clipping and accumulation settings."""

    optimizer_ref: Any  # weakref to the optimizer
    clip: str | None = None
    max_norm: float | None = None
    accumulation_steps: int = 1
    implicit: bool = False  # found by the pass's scan rather than by attach()
    sq_norm: Tensor | None = None  # running sum of squared gradient norms of this step (fp32, 0-d)
    prev_norm: Tensor | None = None  # global gradient norm of the previous step
    micro: dict[int, int] = field(default_factory=dict)  # slot -> backward calls since its last update
    hooks: list[Any] = field(default_factory=list)
    updates: int = 0  # parameter updates run in backward (for tests and stats)

    @property
    def optimizer(self):
        return self.optimizer_ref()


# slot -> (binding, weakref to the parameter); the graph calls the op with the slot number.
_SLOTS: list[tuple[Binding, Any]] = []
_SLOT_OF: dict[int, int] = {}  # id(param) -> slot
_BINDING_OF: dict[int, Binding] = {}  # id(param) -> binding
_FUSED_IDS: set[int] = set()  # id(param) of parameters a compiled backward updates
# bumped by attach / detach / slot_for: the grouped op caches its per-slot lookups per generation
_GEN = [0]
_GROUP_CACHE: dict[tuple, tuple[int, Any, list]] = {}  # slots -> (generation, binding, [weakref])


def _params_of(optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def attach(model_or_params, optimizer, *, clip: str | None = None, max_norm: float | None = None,
           accumulation_steps: int = 1) -> Binding:
    """Bind ``optimizer`` (a HybridAdamW) for in-backward updates of its parameters.

    Call before the compiled model's first forward (the backward graph is
    built then). ``model_or_params`` is the model (or an iterable of its
    parameters) and is used only to check that the optimizer holds them.
    ``clip``: None | "per_param" | "prev_global_norm" (needs ``max_norm``).
    ``accumulation_steps``: micro-batches per optimizer step (see module doc).
    """
    from unsloth_fx.optim import HybridAdamW

    if not isinstance(optimizer, HybridAdamW):
        raise FusedOptimizerError(
            f"fuse_optimizer needs a unsloth_fx.optim.HybridAdamW, got {type(optimizer).__name__}; "
            "HybridAdamW(params, state_precision='fp32') has torch.optim.AdamW's numerics")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip={clip!r}; expected one of {CLIP_MODES}")
    if clip is not None and (max_norm is None or float(max_norm) <= 0):
        raise ValueError(f"clip={clip!r} needs a positive max_norm, got {max_norm!r}")
    if int(accumulation_steps) < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    held = {id(p) for p in _params_of(optimizer)}
    if model_or_params is not None:
        given = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
        missing = [tuple(p.shape) for p in given if p.requires_grad and id(p) not in held]
        if missing:
            warnings.warn(f"fuse_optimizer: {len(missing)} trainable parameter(s) are not in the optimizer "
                          f"(shapes {missing[:3]}...): their gradients stay in param.grad", stacklevel=2)
    old = _BINDING_OF.get(next(iter(held))) if held else None
    if old is not None and old.optimizer is optimizer:
        detach(optimizer)
    b = Binding(weakref.ref(optimizer), clip=clip, max_norm=None if max_norm is None else float(max_norm),
                accumulation_steps=int(accumulation_steps))
    b.hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: _end_step(b)))
    for p in _params_of(optimizer):
        _BINDING_OF[id(p)] = b
        if id(p) in _SLOT_OF:  # re-attach: the compiled graph keeps its slot numbers
            _SLOTS[_SLOT_OF[id(p)]] = (b, weakref.ref(p))
    _install_clip_guard()
    _GEN[0] += 1
    return b


def detach(optimizer) -> None:
    """Unbind ``optimizer``: graphs compiled afterwards keep gradients (existing
    compiled graphs keep calling the op, which then raises)."""
    for p in _params_of(optimizer):
        b = _BINDING_OF.pop(id(p), None)
        if b is not None:
            for h in b.hooks:
                h.remove()
            b.hooks.clear()
        _FUSED_IDS.discard(id(p))
    _GEN[0] += 1


def _is_hybrid(obj: Any, cls: type) -> bool:
    # gc.get_objects() can hold weakref proxies to dead objects; isinstance on one raises ReferenceError.
    try:
        return isinstance(obj, cls)
    except ReferenceError:
        return False


def binding_for(param: Tensor, *, scan: bool = True) -> Binding | None:
    """The binding of ``param``; with ``scan``, bind (with defaults) a live HybridAdamW holding it."""
    b = _BINDING_OF.get(id(param))
    if b is not None and b.optimizer is not None:
        return b
    return bindings_for([param])[0] if scan else None


def bindings_for(params: list[Tensor]) -> list[Binding | None]:
    """:func:`binding_for` of each of ``params``, scanning the live objects at most once (not once per unbound
    parameter: 339 scans took 90 s on a 2-core CPU for r1-distill-qwen-1.5b with no HybridAdamW at all)."""
    out = [binding_for(p, scan=False) for p in params]
    if all(b is not None for b in out):
        return out
    from unsloth_fx.optim import HybridAdamW

    with warnings.catch_warnings():  # isinstance on every live object trips deprecated module attributes
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if _is_hybrid(o, HybridAdamW)]
    for i, p in enumerate(params):
        if out[i] is not None:
            continue
        out[i] = binding_for(p, scan=False)  # bound meanwhile, by an optimizer found for an earlier parameter
        if out[i] is None:
            obj = next((o for o in found if any(q is p for q in _params_of(o))), None)
            if obj is not None:
                out[i] = attach(None, obj)
                out[i].implicit = True
    return out


def slot_for(param: Tensor, binding: Binding) -> int:
    """The slot number the backward graph passes to the op for ``param`` (stable per parameter)."""
    s = _SLOT_OF.get(id(param))
    if s is None:
        s = _SLOT_OF[id(param)] = len(_SLOTS)
        _SLOTS.append((binding, weakref.ref(param)))
    else:
        _SLOTS[s] = (binding, weakref.ref(param))
    _FUSED_IDS.add(id(param))
    _GEN[0] += 1
    return s


def is_fused(param: Tensor) -> bool:
    """Whether a compiled backward updates ``param`` (so its ``.grad`` stays None)."""
    return id(param) in _FUSED_IDS


def last_grad_norm(optimizer) -> Tensor | None:
    """Global L2 norm of the raw gradients of the last completed step (0-d fp32),
    what ``clip_grad_norm_`` would have returned; None before the first step."""
    for p in _params_of(optimizer):
        b = _BINDING_OF.get(id(p))
        if b is not None:
            return b.prev_norm
    return None


def _end_step(b: Binding) -> None:
    """After ``optimizer.step()``: this step's global norm becomes the previous one."""
    if b.sq_norm is not None:
        b.prev_norm = b.sq_norm.sqrt()
        b.sq_norm = None


# --------------------------------------------------------------------------
# the op the backward graph calls
# --------------------------------------------------------------------------

def _accumulate(b: Binding, slot: int, p: Tensor, grad: Tensor) -> Tensor | None:
    """One micro-batch of ``b.accumulation_steps`` (> 1) for parameter ``p`` at ``slot``: None
    before the last micro-batch (the gradient is kept in ``p.grad``), else the summed gradient
    to apply (``p.grad`` is cleared)."""
    n = b.micro.get(slot, 0) + 1
    if n < b.accumulation_steps:
        b.micro[slot] = n
        # what autograd's AccumulateGrad does: keep the first gradient, add the rest
        p.grad = grad.detach().clone() if p.grad is None else p.grad.add_(grad)
        return None
    b.micro[slot] = 0
    if p.grad is not None:
        grad = p.grad.add_(grad)
        p.grad = None
    return grad


def fused_adamw_step_(param: Tensor, grad: Tensor, name: str, slot: int, after: list[Tensor]) -> None:
    """Update parameter ``slot`` (``name`` is for people reading the graph) with
    ``grad`` through its bound optimizer, in place; see the module doc.

    ``after``: values that must be computed before the update; the op never
    reads them. They are the backward values that depend on ``param``'s old
    value and are still used after the update. Making them inputs forces a
    lowering to compute them first: Inductor otherwise inlines a pending
    pointwise read of ``param`` into a kernel it schedules after the mutation
    (see docs/fuse_optimizer.md, "Inductor")."""
    b, ref = _SLOTS[slot]
    p = ref()
    opt = b.optimizer
    if p is None or opt is None or _BINDING_OF.get(id(p)) is not b:
        raise FusedOptimizerError(
            f"the compiled backward updates {name!r} in place, but its optimizer is gone or was detached; "
            "recompile (torch._dynamo.reset()) or compile with fuse_optimizer=False")
    if not p.requires_grad:
        return  # frozen after compiling: never updated (Dynamo also recompiles on the change)
    if b.accumulation_steps > 1:
        grad = _accumulate(b, slot, p, grad)
        if grad is None:
            return
    with torch.no_grad():
        # one read of the gradient, accumulated in fp32 without an fp32 copy; the optimizer's
        # non-finite check reuses it (unclipped gradient: clipping cannot make it finite)
        norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
        sq = norm * norm
        b.sq_norm = sq if b.sq_norm is None else b.sq_norm + sq
        if b.clip == "per_param":
            coef = (b.max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)
            grad = grad * coef.to(grad.dtype)
        elif b.clip == "prev_global_norm" and b.prev_norm is not None:
            coef = (b.max_norm / (b.prev_norm + _CLIP_EPS)).clamp(max=1.0)
            grad = grad * coef.to(grad.dtype)
        # a DTensor's norm is global; the optimizer checks its local shard itself
        opt.step_param(p, grad, grad_norm=norm if type(grad) is Tensor else None)
    b.updates += 1


def _group_lookup(slots: list[int], names: list[str]) -> tuple[Binding, list]:
    """(binding, [weakref to each parameter]) of a group's slots, checked once per generation
    of the bindings (attach / detach / slot_for bump it) instead of once per call."""
    key = tuple(int(s) for s in slots)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] == _GEN[0]:
        return hit[1], hit[2]
    refs, b0 = [], None
    for s, name in zip(key, names):
        b, ref = _SLOTS[s]
        p = ref()
        if p is None or b.optimizer is None or _BINDING_OF.get(id(p)) is not b:
            raise FusedOptimizerError(
                f"the compiled backward updates {name!r} in place, but its optimizer is gone or was detached; "
                "recompile (torch._dynamo.reset()) or compile with fuse_optimizer=False")
        if b0 is not None and b is not b0:
            raise FusedOptimizerError(f"one grouped update holds parameters of two optimizers ({name!r}); "
                                      "recompile (torch._dynamo.reset())")
        b0 = b
        refs.append(ref)
    _GROUP_CACHE[key] = (_GEN[0], b0, refs)
    return b0, refs


def fused_adamw_steps_(params: list[Tensor], grads: list[Tensor], names: list[str], slots: list[int],
                       after: list[Tensor]) -> None:
    """Update parameters ``slots`` (one optimizer; ``names`` for people reading the graph)
    with ``grads``, in place: for each parameter what :func:`fused_adamw_step_` does, with
    the same accumulation, clipping, norm bookkeeping and optimizer numerics, but with the
    host work done once for the group: one multi-tensor norm, the clip coefficients as one
    vector, and :meth:`HybridAdamW.step_params` (multi-tensor counters and kernel launches).
    ``after``: as for :func:`fused_adamw_step_`, the union over the members.

    Differences from one call per parameter, all within fp32 rounding: the group's squared
    norms are summed as a vector before they join the step's running sum (so
    :func:`last_grad_norm`, and the ``prev_global_norm`` clip coefficient built from it, may
    differ in the last bits), and on CUDA the multi-tensor norm reduces in a different order
    than ``vector_norm`` (the norm only decides non-finite skips and clipping)."""
    if not names:
        return
    b, refs = _group_lookup(slots, names)
    opt = b.optimizer
    if opt is None:
        raise FusedOptimizerError(
            f"the compiled backward updates {names[0]!r} in place, but its optimizer is gone or was detached; "
            "recompile (torch._dynamo.reset()) or compile with fuse_optimizer=False")
    accum = b.accumulation_steps
    ps, gs = [], []
    for ref, grad, s in zip(refs, grads, slots):
        p = ref()
        if p is None:
            raise FusedOptimizerError("a parameter the compiled backward updates was freed; recompile")
        if not p.requires_grad:
            continue  # frozen after compiling: never updated (Dynamo also recompiles on the change)
        if accum > 1:
            grad = _accumulate(b, s, p, grad)
            if grad is None:
                continue
        ps.append(p)
        gs.append(grad.detach())
    if not ps:
        return
    with torch.no_grad():
        plain = [type(g) is Tensor for g in gs]
        if all(plain):
            norms = _compat.foreach_norm_fp32(gs)
        else:  # a DTensor's norm is global: one call each (the optimizer checks its local shard itself)
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]
        nv = torch.stack(norms) if len(norms) > 1 else norms[0].reshape(1)
        sq = (nv * nv).sum()
        b.sq_norm = sq if b.sq_norm is None else b.sq_norm + sq
        coef = None
        if b.clip == "per_param":
            coef = (b.max_norm / (nv + _CLIP_EPS)).clamp(max=1.0)
        elif b.clip == "prev_global_norm" and b.prev_norm is not None:
            coef = (b.max_norm / (b.prev_norm + _CLIP_EPS)).clamp(max=1.0).expand(len(gs))
        if coef is not None:
            by_dtype: dict = {}
            for k, g in enumerate(gs):
                by_dtype.setdefault(g.dtype, []).append(k)
            for dt, ks in by_dtype.items():
                cs = coef.to(dt).unbind()
                for k, out in zip(ks, _compat.foreach_mul([gs[k] for k in ks], [cs[k] for k in ks])):
                    gs[k] = out
        opt.step_params(ps, gs, [n if pl else None for n, pl in zip(norms, plain)])
    b.updates += len(ps)


# Registered through the low-level Library API with one CompositeExplicitAutograd kernel rather
# than torch.library.custom_op: the op runs once per parameter per step inside backward, and
# custom_op's Python autograd and ADInplaceOrView wrappers cost about 60% of its host time
# (cProfile, benchmarks/bench_update_overhead.py). The schema (mutable param) is the same, so
# tracing and functionalization see the same op; torch's C++ autograd fallback bumps the version.
_LIB = torch.library.Library("unsloth_fx", "FRAGMENT")
_LIB.define("fused_adamw_step_(Tensor(a!) param, Tensor grad, str name, SymInt slot, Tensor[] after) -> ()")
_LIB.impl("fused_adamw_step_", fused_adamw_step_, "CompositeExplicitAutograd")


@torch.library.register_fake("unsloth_fx::fused_adamw_step_", lib=_LIB)
def _(param, grad, name, slot, after):
    return None


# the grouped form (passes/fuse_optimizer.py emits it unless group_bytes=0), registered the same way
_LIB.define("fused_adamw_steps_(Tensor(a!)[] params, Tensor[] grads, str[] names, SymInt[] slots, "
            "Tensor[] after) -> ()")
_LIB.impl("fused_adamw_steps_", fused_adamw_steps_, "CompositeExplicitAutograd")


@torch.library.register_fake("unsloth_fx::fused_adamw_steps_", lib=_LIB)
def _(params, grads, names, slots, after):
    return None


# --------------------------------------------------------------------------
# plain clip_grad_norm_ on fused parameters: refuse, naming the options
# --------------------------------------------------------------------------

_CLIP_MSG = (
    "clip_grad_norm_ cannot clip parameters whose optimizer update runs inside backward "
    "(fuse_optimizer=True): their gradients never exist all at once (param.grad is None), so the global "
    "norm is unknown when each update runs. Options: unsloth_fx.fusion.attach(model, optimizer, "
    "clip='prev_global_norm', max_norm=...) (scale by the previous step's global norm), "
    "clip='per_param' (clip each gradient by its own norm), or compile with fuse_optimizer=False to "
    "keep exact global-norm clipping.")


def _guarded(orig):
    def clip_grad_norm_(parameters, *args, **kwargs):
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        if any(id(p) in _FUSED_IDS and p.grad is None for p in params):
            raise FusedOptimizerError(_CLIP_MSG)
        return orig(params, *args, **kwargs)

    clip_grad_norm_.__wrapped__ = orig  # type: ignore[attr-defined]
    clip_grad_norm_.__doc__ = orig.__doc__
    clip_grad_norm_._ufx_guard = True  # type: ignore[attr-defined]
    return clip_grad_norm_


def _install_clip_guard() -> None:
    """Wrap ``torch.nn.utils.clip_grad_norm_`` (both spellings) once; unfused
    parameters pass straight through to torch's function."""
    import torch.nn.utils as U
    import torch.nn.utils.clip_grad as C

    for mod in (U, C):
        fn = getattr(mod, "clip_grad_norm_")
        if not getattr(fn, "_ufx_guard", False):
            setattr(mod, "clip_grad_norm_", _guarded(fn))
