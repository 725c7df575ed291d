"""Memory model: predict a training step's device-memory timeline from its joint graph.

Units: bytes everywhere; steps are positions in the execution order
(forward graph, then backward graph, then the optimizer step).

How the prediction is made:

* The joint graph is partitioned exactly as the backend will partition it
  (torch's min-cut partitioner, honouring ``meta["recompute"]`` tags), on a
  shallow copy, so "saved activations" are the values the partitioner really
  saves, not every forward value backward touches.
* The forward graph and then the backward graph are walked in node order.
  A node allocates the storages it creates; views and aliases share their
  base's storage (identity of the fake tensor's storage, the same test
  torch's own partitioner and Inductor use) and allocate nothing. A storage
  is freed after its last use, except graph outputs (forward: kept if
  saved for backward; backward: gradients, kept to the end).
* Every allocation is rounded as the CUDA caching allocator rounds blocks
  (multiples of 512 bytes), which is what ``torch.cuda.max_memory_allocated``
  reports. Reserved memory (2 MiB / 20 MiB segments) is not modelled.
* Static bytes (parameters, buffers, optimizer state, gradients) come from
  :func:`static_breakdown`; the optimizer step runs after backward with the
  gradients alive plus the step's own temporaries.
* Attention: traced on CPU the CLI routes SDPA to the memory-efficient
  kernel's op (output + logsumexp, no s x s matrix), as on CUDA; see trace.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx

from unsloth_fx import _compat

BLOCK = 512  # CUDA caching allocator block rounding (bytes)

# Optimizer state in bytes per trainable parameter, and the temporaries of one
# step (bytes per parameter) for the stock foreach implementation. For the
# HybridAdamW tiers ("hybrid", "int8", "int4", "fp32", "bf16") these flat figures
# are only used for rows without a name and shape (legacy callers); rows with
# them are counted exactly, per parameter, by HybridAdamW's own tier policy
# (unsloth_fx.optim.tier_for) and allocation (state_tensor_nbytes).
OPTIMIZER_STATE = {
    "adamw": 8.0,  # two fp32 moments
    "adamw-bf16": 4.0,  # two bf16 moments (torch.optim.AdamW on bf16 parameters)
    "hybrid": 2.0,  # HybridAdamW, mostly 4-bit blockwise moments (flat approximation, see above)
    "int8": 2.0,
    "int4": 1.0,
    "fp32": 8.0,
    "bf16": 4.0,
    "sgd": 0.0,
}
# torch's foreach AdamW materializes sqrt(v) for every parameter at once.
OPTIMIZER_STEP_TEMP = {"adamw": 4.0, "adamw-bf16": 2.0, "hybrid": 0.0, "int8": 0.0, "int4": 0.0, "fp32": 0.0,
                       "bf16": 0.0, "sgd": 0.0}
HYBRID_TIERS = ("hybrid", "int8", "int4", "fp32", "bf16")  # HybridAdamW state_precision values


@dataclass(frozen=True)
class StatePolicy:
    """The HybridAdamW settings that decide its state bytes (see unsloth_fx.optim).

    As an optimizer spec string: ``"<state_precision>[/<high_precision_tier>]"``,
    e.g. ``"hybrid"`` (HybridAdamW's defaults: embeddings / LM head fp32) or
    ``"hybrid/int4"`` (embeddings / LM head int4). ``hybrid_cap``: the hybrid
    tier's fp32 pool is allocated at this fraction of each tensor's blocks on the
    first step, whatever the gate later promotes, so counting the cap is exact
    for the allocation (and the worst case of what the gate can use)."""

    state_precision: str = "hybrid"
    high_precision_tier: str = "fp32"
    hybrid_bits: int = 4
    hybrid_cap: float = 0.1
    min_quant_numel: int = 4096
    quantize_all: bool = False
    check_finite: bool = True
    # HybridAdamW's state_arena: its state in one buffer per dtype (so the allocator model counts a few blocks)
    state_arena: bool = True

    @property
    def key(self) -> str:
        """The spec string (round-trips through :func:`parse_optimizer`; extra settings are not encoded)."""
        quantized = self.state_precision not in ("fp32", "bf16") and not self.quantize_all
        if quantized and self.high_precision_tier != "fp32":
            return f"{self.state_precision}/{self.high_precision_tier}"
        return self.state_precision

    def describe(self) -> str:
        sp = self.state_precision
        if sp in ("fp32", "bf16") or self.quantize_all:
            return f"HybridAdamW {sp} moments for every parameter"
        body = f"{sp} ({self.hybrid_bits}-bit store, fp32 pool at cap {self.hybrid_cap:g})" if sp == "hybrid" else sp
        return (f"HybridAdamW {body} moments; embeddings / LM head {self.high_precision_tier}; norms, biases, "
                f"1-D and tensors under {self.min_quant_numel} elements fp32")


def parse_optimizer(optimizer: Any) -> tuple[str, StatePolicy | None]:
    """(flat key for OPTIMIZER_STATE, HybridAdamW policy or None for torch optimizers).
    ``optimizer``: a spec string (``"adamw"``, ``"adamw-bf16"``, ``"sgd"``, ``"hybrid"``,
    ``"int8/int4"``, ...) or a :class:`StatePolicy`."""
    from unsloth_fx.runtime.adamw import TIERS

    if isinstance(optimizer, StatePolicy):
        return optimizer.state_precision, optimizer
    if not isinstance(optimizer, str):
        raise ValueError(f"optimizer={optimizer!r}: expected a spec string, a StatePolicy or an optimizer instance")
    base, _, hp = optimizer.partition("/")
    if base not in OPTIMIZER_STATE or (hp and (base not in HYBRID_TIERS or hp not in TIERS)):
        raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZER_STATE)}, optionally "
                         f"'/<tier of embeddings and LM head>' after a HybridAdamW tier ({', '.join(TIERS)}), "
                         "e.g. 'hybrid/int4'")
    if base in HYBRID_TIERS:
        return base, StatePolicy(state_precision=base, high_precision_tier=hp or "fp32")
    return base, None


def round_block(nbytes: int) -> int:
    """Bytes the caching allocator hands out for a request of ``nbytes`` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return BLOCK * math.ceil(nbytes / BLOCK)


class UnsizedGraphWarning(UserWarning):
    """A tensor size depends on data (an unbacked symbol): the estimate is conservative."""


@dataclass
class Static:
    """The step's static bytes. ``gradients`` are alive from the end of backward
    through the optimizer step (zero when the update is fused into backward)."""

    parameters: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    optimizer_temp: int = 0  # temporaries inside optimizer.step()
    inputs: int = 0
    # CUDA library workspaces (cuBLAS/cuBLASLt) the caching allocator serves during the step;
    # set by plan_memory for CUDA graphs (its workspace_reserve option), 0 elsewhere
    workspace: int = 0
    # bytes the CUDA caching allocator's blocks hold beyond the resident tensors' own (rounded to 512 B):
    # set by plan_memory on CUDA from ``resident_requests`` (unsloth_fx.memory.allocator), 0 elsewhere
    block_slack: int = 0
    # the resident tensors' allocations in order (parameters and buffers, then optimizer state; one request
    # for a state arena): what the allocator model replays
    resident_requests: list[int] = field(default_factory=list)
    num_params: int = 0
    optimizer: str = "adamw"
    fuse_optimizer: bool = False
    # optimizer-state bytes by moment tier (HybridAdamW) or by kind, and what was assumed
    state_by_tier: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    # fused update: bytes the update of one parameter allocates besides its gradient
    # (HybridAdamW's isfinite mask; the hybrid tier's first-step scratch), by parameter name
    step_temp: dict[str, int] = field(default_factory=dict)
    biggest_grad: int = 0
    # fused update: consecutive updates share one call until their gradients pass this many bytes
    # (the fuse_optimizer pass's group_bytes; None: its default); those gradients wait for the call
    fuse_group_bytes: int | None = None
    # the lowering whose buffers the timeline models: "inductor" does not materialize the
    # pointwise chains Inductor fuses into their consumers (see inductor_inlined); "eager"
    # (and anything else) materializes every FX node
    lower: str = "eager"
    # the backward scales the fused LM head's saved gradients in place (the default pipeline's
    # inplace_saved_grad_scale pass, which runs after plan_memory): each traced
    # ``lce_grad_scale(saved, s)`` whose saved input has no other reader allocates nothing and is
    # its input's storage (see _inplace_scaled)
    inplace_grad_scale: bool = True

    @property
    def resident(self) -> int:
        """Bytes alive during the whole step (before gradients appear)."""
        return self.parameters + self.buffers + self.optimizer_state + self.inputs + self.workspace + self.block_slack


def static_breakdown(
    params: Iterable[tuple],
    optimizer: Any = "adamw",
    fuse_optimizer: bool = False,
    *,
    fuse_group_bytes: int | None = None,
) -> Static:
    """Static bytes of a step. Each tensor is a separate allocation, so each is
    rounded to a block (as is each optimizer-state tensor).

    ``params``: one row per tensor, ``(numel, dtype, requires_grad, is_buffer[, name[, shape]])``.
    ``optimizer``: a spec string (see :func:`parse_optimizer`), a :class:`StatePolicy`, or an
    optimizer instance (``HybridAdamW``: its :meth:`state_layout`, i.e. the state it holds or
    will allocate; ``torch.optim.AdamW``/``Adam``: its state, or two moments in the parameter's
    dtype), matched to the rows by name (rows need names then).

    HybridAdamW state is exact per parameter for rows with name and shape: the tier comes from
    ``unsloth_fx.optim.tier_for`` and the bytes from the same ``init_state`` the optimizer runs.
    Rows without them fall back to the flat bytes/parameter of ``OPTIMIZER_STATE``.

    ``fuse_group_bytes``: with ``fuse_optimizer``, the fuse_optimizer pass's ``group_bytes``
    (None: its default): up to that many bytes of gradients wait for their group's update.
    """
    instance = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    if instance is not None:
        layout = optimizer_state_layout(instance)
        key, policy = type(instance).__name__, None
    else:
        key, policy = parse_optimizer(optimizer)
        layout = None
    s = Static(optimizer=key if instance is not None else (policy.key if policy else key), fuse_optimizer=fuse_optimizer,
               fuse_group_bytes=fuse_group_bytes)
    flat_rows = 0
    rows = list(params)
    state_requests: list[int] = []
    arena_items: list[tuple[str, int, int, float]] = []  # (tier, numel, hybrid_bits, hybrid_cap) of policy rows
    if layout is not None and layout and all(isinstance(k, str) and k.startswith("#") for k in layout):
        # an optimizer built from unnamed parameters: its k-th parameter is the k-th trainable row
        trainable = [r for r in rows if r[2] and not r[3]]
        layout = {(r[4] if len(r) > 4 else None): v for r, v in zip(trainable, layout.values())}
    for row in rows:
        numel, dtype, requires_grad, is_buffer = row[:4]
        name = row[4] if len(row) > 4 else None
        shape = row[5] if len(row) > 5 else None
        nbytes = round_block(int(numel) * _itemsize(dtype))
        s.resident_requests.append(nbytes)
        if is_buffer:
            s.buffers += nbytes
            continue
        s.parameters += nbytes
        if not requires_grad:
            continue
        s.num_params += int(numel)
        s.biggest_grad = max(s.biggest_grad, nbytes)
        s.gradients += nbytes
        temp = 0
        if layout is not None:
            tier, sizes = layout.get(name, ("missing", None)) if name is not None else ("missing", None)
            if sizes is None:
                raise ValueError(f"static_breakdown: parameter {name!r} is not held by the {key} instance "
                                 "(rows must carry the names the optimizer was given)")
            state = sum(round_block(b) for b in sizes)
            state_requests.extend(sizes)
            temp = _hybrid_step_temp(tier, int(numel), dtype, sizes) if key == "HybridAdamW" else 0
        elif policy is not None and shape is not None:
            from unsloth_fx.optim import state_tensor_nbytes, tier_for

            tier = tier_for(name, shape, policy.state_precision, quantize_all=policy.quantize_all,
                            min_quant_numel=policy.min_quant_numel, high_precision_tier=policy.high_precision_tier)
            sizes = state_tensor_nbytes(tier, int(numel), hybrid_bits=policy.hybrid_bits,
                                        hybrid_cap=policy.hybrid_cap) + (4, 4)  # + step, nonfinite_skips
            state = sum(round_block(b) for b in sizes)
            state_requests.extend(sizes)
            arena_items.append((tier, int(numel), policy.hybrid_bits, policy.hybrid_cap))
            temp = _hybrid_step_temp(tier, int(numel), dtype, sizes, policy.check_finite)
        else:
            tier = key
            flat_rows += 1
            state = round_block(int(numel * OPTIMIZER_STATE[key]))
            # torch's Adam/AdamW: two moments of the parameter's size (the flat bytes split in two)
            state_requests.extend([state // 2] * 2 if key.startswith("adamw") else [state])
            s.optimizer_temp += round_block(int(numel * OPTIMIZER_STEP_TEMP[key]))
        s.optimizer_state += state
        s.state_by_tier[tier] = s.state_by_tier.get(tier, 0) + state
        if temp:
            s.step_temp[name or f"#{len(s.step_temp)}"] = temp
            s.optimizer_temp = max(s.optimizer_temp, temp)  # HybridAdamW steps one parameter at a time
    # HybridAdamW(state_arena=True) allocates its state as one buffer per dtype, not one per tensor
    if instance is not None and getattr(instance, "state_arena", False):
        s.resident_requests += instance.state_arena_sizes()
    elif instance is None and policy is not None and policy.state_arena and arena_items:
        from unsloth_fx.optim import arena_sizes

        s.resident_requests += arena_sizes(arena_items)
    else:
        s.resident_requests += state_requests
    if instance is not None:
        s.assumptions.append(f"optimizer state: the {key} instance's own layout (state it holds, or what its "
                             "first step allocates)")
    elif policy is not None:
        s.assumptions.append(f"optimizer state: {policy.describe()}"
                             + (f"; {flat_rows} unnamed tensor(s) at a flat {OPTIMIZER_STATE[key]:g} B/param"
                                if flat_rows else ""))
        if policy.state_precision == "hybrid" or policy.high_precision_tier == "hybrid":
            s.assumptions.append(f"hybrid tier: fp32 pool allocated at hybrid_cap={policy.hybrid_cap:g} of each "
                                 "tensor's blocks (exact for the allocation; the gate never uses more)")
    if fuse_optimizer:
        # The update runs inside backward, in groups of consecutive updates (the pass's
        # group_bytes): a group's gradients wait for its call, so up to the cap of gradients
        # (or the one larger gradient) is in flight, plus one member update's temporaries.
        pending = max(s.biggest_grad, min(s.gradients, _group_bytes(s)))
        s.gradients = 0
        s.optimizer_temp = max([pending] + [t + max(g, pending) for t, g in _temps_with_grads(s, rows)])
        s.assumptions.append("optimizer fused into backward: no gradient buffers; each gradient freed by its "
                             f"group's update (groups of up to {_group_bytes(s)} B of gradients)")
    return s


def _group_bytes(s: Static) -> int:
    if s.fuse_group_bytes is not None:
        return int(s.fuse_group_bytes)
    from unsloth_fx.passes.fuse_optimizer import DEFAULT_GROUP_BYTES

    return DEFAULT_GROUP_BYTES


def _temps_with_grads(s: Static, params: Iterable[tuple]) -> list[tuple[int, int]]:
    out = []
    if not s.step_temp:
        return out
    for row in params:
        name = row[4] if len(row) > 4 else None
        if name in s.step_temp and not row[3] and row[2]:
            out.append((s.step_temp[name], round_block(int(row[0]) * _itemsize(row[1]))))
    return out


def _hybrid_step_temp(tier: str, numel: int, dtype: torch.dtype, sizes: tuple[int, ...],
                      check_finite: bool = True) -> int:
    """Bytes one HybridAdamW parameter update allocates besides the gradient: for the hybrid
    tier's first step, the scratch copies of the parameter and its state; otherwise none.

    ``check_finite`` costs no temporary: the update reads the gradient's fp32 L2 norm (one
    reduction, a 0-d result) instead of an ``isfinite(grad)`` mask. On CUDA the norm of a
    bf16/fp16 gradient accumulates in fp32 without a converted copy (torch's mixed-precision
    reduction); on a CPU torch converts first (4 B/element), which this CUDA model does not
    count. (Until the seventh session this charged a 1 B/element mask the runtime stopped
    allocating in the first session.)"""
    del check_finite  # kept in the signature: callers pass the policy's setting
    temp = 0
    if tier == "hybrid":
        temp += round_block(numel * _itemsize(dtype)) + sum(round_block(b) for b in sizes)
    return temp


def optimizer_state_layout(opt: torch.optim.Optimizer) -> dict[str | None, tuple[str, tuple[int, ...]]]:
    """{parameter name: (tier or kind, bytes of each device state tensor)} for an optimizer
    instance. HybridAdamW: :meth:`~unsloth_fx.optim.HybridAdamW.state_layout`. Other
    optimizers: the tensors in ``opt.state`` on the parameter's device, or, before the
    first step, AdamW/Adam's two moments in the parameter's dtype. Names come from the
    groups' ``param_names`` (given ``named_parameters()``), else ``"#<index>"``."""
    if hasattr(opt, "state_layout"):
        return {name: (tier, sizes) for name, tier, sizes in opt.state_layout()}
    out: dict[str | None, tuple[str, tuple[int, ...]]] = {}
    k = 0
    for g in opt.param_groups:
        names = g.get("param_names")
        for i, p in enumerate(g["params"]):
            k += 1
            name = names[i] if names else f"#{k}"
            st = opt.state.get(p)
            if st:
                sizes = tuple(t.numel() * t.element_size() for t in st.values()
                              if isinstance(t, torch.Tensor) and t.device == p.device)
            elif type(opt).__name__ in ("AdamW", "Adam"):
                sizes = (p.numel() * p.element_size(),) * 2
            else:
                raise ValueError(f"optimizer_state_layout: no state yet for {type(opt).__name__} and no known "
                                 "layout; step it once, or pass a spec string")
            out[name] = (type(opt).__name__, sizes)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ---------------------------------------------------------------- sizes


@dataclass
class SizeInfo:
    nbytes: int  # with concrete hints (conservative bound when unbacked)
    expr: Any = None  # sympy expression when the size is symbolic
    unbacked: bool = False


def storage_size(val: Any, unbacked_default: int = 8192) -> SizeInfo:
    """Bytes of the storage behind a fake tensor (symbolic sizes evaluated at their
    hints; an unbacked size uses its upper bound, or ``unbacked_default``)."""
    if not isinstance(val, torch.Tensor):
        return SizeInfo(0)
    try:
        n = val.untyped_storage().nbytes()
    except Exception:
        n = None
    if isinstance(n, int):
        return SizeInfo(n)
    # symbolic: numel * itemsize over the tensor's own sizes (contiguous bound)
    itemsize = val.element_size()
    total_hint, expr, unbacked = itemsize, itemsize, False
    for s in val.shape:
        hint, e = _compat.symint_hint(s)
        if hint is None:
            unbacked = True
            hint = _upper_bound(s, unbacked_default)
        total_hint *= hint
        expr = expr * e
    return SizeInfo(int(total_hint), expr, unbacked)


def _upper_bound(s: Any, default: int) -> int:
    try:
        node = s.node
        rng = node.shape_env.var_to_range.get(node.expr)
        if rng is not None and rng.upper.is_finite:
            return int(rng.upper)
    except Exception:
        pass
    return default


def source_line(node: torch.fx.Node) -> str | None:
    """"file:line" of the user code that made the node (last frame of its stack trace)."""
    rec = node.meta.get("ufx")
    if rec is not None and rec.source:
        return rec.source
    st = node.meta.get("stack_trace")
    if not st:
        return None
    for line in reversed(st.strip().splitlines()):
        line = line.strip()
        if line.startswith("File "):
            parts = line.split('"')
            if len(parts) >= 3:
                lineno = parts[2].split("line")[-1].split(",")[0].strip()
                return f"{parts[1].rsplit('/', 1)[-1]}:{lineno}"
    return None


# ---------------------------------------------------------------- timeline


@dataclass
class Event:
    step: int
    phase: str  # forward | backward | optimizer
    node: str
    kind: str  # alloc | free
    bytes: int
    live_bytes: int  # total device bytes live after this event (static included)
    category: str  # saved | transient | recomputed | gradients | outputs | inputs | workspace | optimizer
    decision: str | None = None
    source: str | None = None
    expr: str | None = None  # symbolic size, when dynamic


@dataclass
class Timeline:
    """A predicted step: events, the peak and where it happens."""

    static: Static
    events: list[Event] = field(default_factory=list)
    peak: int = 0
    peak_step: int = 0
    peak_node: str = ""
    peak_phase: str = ""
    saved_bytes: int = 0  # activations kept from forward for backward (rounded)
    saved: dict[str, int] = field(default_factory=dict)  # name -> bytes
    peak_by_category: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    steps: int = 0

    @property
    def activation_peak(self) -> int:
        """Peak bytes above parameters, buffers, optimizer state and inputs."""
        return self.peak - self.static.resident


def partition(joint: torch.fx.GraphModule, num_fwd_outputs: int, how: str = "min_cut"):
    """Partition a shallow copy of ``joint`` (tags honoured); the input graph is untouched."""
    g = torch.fx.Graph()
    out = g.graph_copy(joint.graph, {})
    g.output(out)
    with _compat.lazy_graph_modules():  # graphs to walk, not to run: no Python code generated
        gm = _compat.graph_module(joint, g)
        primals, tangents = [], []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                (tangents if "tangents" in n.name else primals).append(n.meta.get("val"))
        fn = _compat.min_cut_partition if how == "min_cut" else _compat.default_partition
        return fn(gm, [primals, tangents], num_fwd_outputs=num_fwd_outputs)


_WORKSPACE_OPS = ("_efficient_attention_backward", "_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
                  "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_cudnn_attention_backward")


def _arg_val(node: torch.fx.Node, i: int) -> Any:
    a = node.args[i] if len(node.args) > i else None
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else a


def _hint(x: Any) -> int:
    return _compat.symint_hint(x)[0] or 0


# unsloth_fx.linear_cross_entropy's arguments after (hidden, weight, labels), with the schema's defaults
_LCE_OPTIONS = (("ignore_index", -100), ("chunks", 4), ("chunk_size", 0), ("reduction", "mean"),
                ("compute_grad", True), ("grad_weight_accum", "fp32"))


def lce_options(node: torch.fx.Node) -> dict[str, Any]:
    """The options of an ``unsloth_fx.linear_cross_entropy`` node by name (a traced graph drops trailing defaults)."""
    return {k: node.args[i] if len(node.args) > i else node.kwargs.get(k, d)
            for i, (k, d) in enumerate(_LCE_OPTIONS, 3)}


def _workspace(node: torch.fx.Node) -> int:
    """Bytes a kernel allocates internally for the duration of one op (not graph values).

    * Flash / memory-efficient attention backward accumulate dQ in fp32: ~ q.numel() * 4.
    * ``unsloth_fx.linear_cross_entropy`` (a multi-output op: its outputs are counted at its
      getitems, after it): everything it holds while it runs, outputs included, for its
      ``grad_weight_accum`` mode (``runtime.linear_cross_entropy.workspace_bytes``).
    * ``unsloth_fx.embedding_dense_backward``: its ``[tokens, hidden]`` fp32 partial sums and index
      buffers (``runtime.embedding_backward.workspace_bytes``); its ``[V, H]`` output is the node's.
    * ``aten.embedding_dense_backward`` (lower="eager": torch's CUDA kernel): fp32 partial sums per
      token, ``tokens x hidden x 4`` (the size of the acc type), and six int64 ``[tokens]`` index
      buffers (EmbeddingBackwardKernel.cu, Embedding.cu).
    """
    name = getattr(node.target, "__name__", str(node.target))
    if any(name.startswith(op) for op in _WORKSPACE_OPS):
        q = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) else None
        if isinstance(q, torch.Tensor):
            return round_block(storage_size(q).nbytes * 4 // max(q.element_size(), 1))
        return 0
    if node.op != "call_function" or not isinstance(node.target, _compat.OpOverload):
        return 0
    op = str(node.target)  # by name: the runtime ops register on import of unsloth_fx.runtime
    if op == "unsloth_fx.linear_cross_entropy.default":
        h, w = _arg_val(node, 0), _arg_val(node, 1)
        if not (isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor)):
            return 0
        from unsloth_fx.runtime.linear_cross_entropy import workspace_bytes as lce_bytes

        o = lce_options(node)
        V, H = _hint(w.shape[0]), _hint(w.shape[1])
        tokens = _hint(h.numel()) // max(H, 1)
        return lce_bytes(tokens, V, H, w.dtype, int(o["chunks"]), int(o["chunk_size"]), bool(o["compute_grad"]),
                         str(o["grad_weight_accum"]))
    if op in ("unsloth_fx.embedding_dense_backward.default", "aten.embedding_dense_backward.default"):
        g, idx = _arg_val(node, 0), _arg_val(node, 1)
        if not (isinstance(g, torch.Tensor) and isinstance(idx, torch.Tensor)):
            return 0
        tokens, hidden = _hint(idx.numel()), _hint(g.shape[-1]) if g.dim() else 1
        if op.startswith("unsloth_fx."):
            from unsloth_fx.runtime.embedding_backward import workspace_bytes as emb_bytes

            return round_block(emb_bytes(tokens, hidden, g.dtype, bool(_arg_val(node, 4))))
        return round_block(tokens * hidden * 4) + 6 * round_block(tokens * 8)
    return 0


def simulate(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    num_fwd_outputs: int,
    static: Static,
    *,
    recomputable: set[str] | None = None,
    keep_outputs: bool = False,
) -> Timeline:
    """Walk the forward then the backward graph and return the predicted timeline.

    ``recomputable``: names of the joint graph's forward nodes, so backward nodes
    with those names are labelled "recomputed". ``keep_outputs``: the caller holds
    the forward outputs (e.g. logits) through backward.
    """
    return _Walker(static, recomputable or set()).run(fw, bw, num_fwd_outputs, keep_outputs)


def _decision(node: Any) -> str | None:
    if isinstance(node, torch.fx.Node):
        rec = node.meta.get("ufx")
        return rec.decision if rec is not None else None
    return None


def _fused_updates(fw: torch.fx.GraphModule, bw: torch.fx.GraphModule,
                   static: Static) -> dict[int, list[tuple[torch.fx.Node, int]]]:
    """Where the fuse_optimizer pass puts each parameter's update in the backward graph:
    {backward node index: [(gradient node, bytes the update allocates)]}.

    As the pass places it: after the gradient is produced and after the last backward
    node that reads the parameter or any forward value depending on it (saved for
    backward, or recomputed there). Backward output ``i`` is the gradient of forward
    placeholder ``i``."""
    fw_ph = [n for n in fw.graph.nodes if n.op == "placeholder"]
    mask: dict[str, int] = {}
    for k, n in enumerate(fw_ph):
        mask[n.name] = 1 << k
    for n in fw.graph.nodes:
        if n.op == "call_function":
            m = 0
            for a in n.all_input_nodes:
                m |= mask.get(a.name, 0)
            if m:
                mask[n.name] = m
    nodes = list(bw.graph.nodes)
    # forward values in backward: saved inputs, and nodes computed only from them (recomputed)
    fwd_like: set[torch.fx.Node] = set()
    bmask: dict[torch.fx.Node, int] = {}  # forward value -> primals it depends on
    last_read: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            if not n.name.startswith("tangents"):
                fwd_like.add(n)
                if mask.get(n.name):
                    bmask[n] = mask[n.name]
            continue
        if n.op != "call_function":
            continue
        read = 0
        for a in n.all_input_nodes:
            read |= bmask.get(a, 0)
        m = read
        while m:
            low = m & -m
            last_read[low.bit_length() - 1] = i
            m ^= low
        if all(a in fwd_like for a in n.all_input_nodes):
            fwd_like.add(n)
            if read:
                bmask[n] = read
    out_args = nodes[-1].args[0] if nodes and nodes[-1].op == "output" else ()
    pos = {n: i for i, n in enumerate(nodes)}
    from unsloth_fx.passes.fuse_optimizer import grad_nbytes, plan_groups

    updates, member = [], {}
    for k, g in enumerate(out_args):
        if not isinstance(g, torch.fx.Node) or g not in pos or k >= len(fw_ph):
            continue
        rec = fw_ph[k].meta.get("ufx")
        name = rec.param if rec is not None else None
        val = g.meta.get("val")
        numel = val.numel() if isinstance(val, torch.Tensor) else 0
        temp = static.step_temp.get(name, round_block(int(numel)) if static.step_temp else 0) \
            if isinstance(numel, int) else 0
        at = max(pos[g], last_read.get(k, -1))
        # one optimizer assumed: the pass also splits groups where the optimizer changes (never later)
        updates.append((at, k, None, grad_nbytes(g)))
        member[k] = (g, temp)
    # as the pass groups them: every member's gradient stays alive until its group's call, which
    # runs where the group's last update would have
    fused: dict[int, list[tuple[torch.fx.Node, int]]] = {}
    for grp in plan_groups(updates, _group_bytes(static)):
        fused.setdefault(grp[-1][0], []).extend(member[u[1]] for u in grp)
    return fused



# ---------------------------------------------------------------- Inductor fusion

_aten = torch.ops.aten
# Ops Inductor lowers as pointwise loops besides those tagged torch.Tag.pointwise: constant
# fills, dtype conversions, iota.
_POINTWISE_EXTRA = {_aten._to_copy.default, _aten.full.default, _aten.full_like.default, _aten.zeros_like.default,
                    _aten.ones_like.default, _aten.zeros.default, _aten.ones.default, _aten.scalar_tensor.default,
                    torch.ops.prims.iota.default}
# Consumers whose generated code reads their input by index (a fused producer is inlined into
# them): reductions, indexing loads, and the index_put / scatter-add family (their ``self`` is
# cloned into the output buffer, which realizes an unrealized producer once, there).
_FUSING_CONSUMERS = {
    _aten.sum.dim_IntList, _aten.sum.default, _aten.amax.default, _aten.amin.default, _aten.mean.dim,
    _aten.mean.default, _aten.prod.dim_int, _aten.var_mean.correction, _aten.var.correction, _aten.max.dim,
    _aten.min.dim, _aten.argmax.default, _aten.argmin.default, _aten.any.dim, _aten.all.dim,
    _aten._log_softmax.default, _aten._softmax.default, _aten._log_softmax_backward_data.default,
    _aten._softmax_backward_data.default, _aten.gather.default, _aten.index.Tensor, _aten.embedding.default,
    _aten.index_put.default, _aten._unsafe_index_put.default, _aten._unsafe_masked_index_put_accumulate.default,
    _aten.scatter_add.default, _aten.index_add.default,
}
REALIZE_READS = 4  # torch._inductor.config.realize_reads_threshold: a reused producer reading more is stored
REALIZE_OPS = 30  # realize_opcount_threshold: a reused producer with a larger expression is stored
MAX_READS = 8  # realize_acc_reads_threshold: a producer accumulating more reads is stored


def _pointwise(n: torch.fx.Node) -> bool:
    t = n.target
    if t in _POINTWISE_EXTRA:
        if t is _aten._to_copy.default:  # a dtype conversion on the same device, not a transfer
            src, out = n.args[0].meta.get("val") if n.args else None, n.meta.get("val")
            return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.device == out.device
        return True
    if t is _aten.scatter.value:
        return _scatter_upon_full(n)
    return isinstance(t, _compat.OpOverload) and torch.Tag.pointwise in t.tags


def _scatter_upon_full(n: torch.fx.Node) -> bool:
    """``scatter(full(...), dim, index, scalar)`` with one index per row: Inductor's joint-graph
    pattern (scatter_upon_const_tensor, on by default) rewrites it to a pointwise ``where`` (this is
    how the decomposed nll_loss_backward reaches the lowering)."""
    base, dim, index = n.args[0], n.args[1], n.args[2]
    if not (isinstance(base, torch.fx.Node) and base.target is _aten.full.default and isinstance(index, torch.fx.Node)):
        return False
    iv, bv = index.meta.get("val"), base.meta.get("val")
    if not (isinstance(iv, torch.Tensor) and isinstance(bv, torch.Tensor) and iv.dim() == bv.dim()):
        return False
    dim = dim + bv.dim() if dim < 0 else dim
    for k, (a, b) in enumerate(zip(iv.shape, bv.shape)):
        if k != dim and _compat.symint_hint(a)[0] != _compat.symint_hint(b)[0]:
            return False
    return _compat.symint_hint(iv.shape[dim])[0] == 1


def inductor_inlined(nodes: list[torch.fx.Node], storage: Any, pinned: set[Any]) -> dict[Any, frozenset]:
    """Storages of one graph that Inductor does not materialize, each with the materialized
    storages its inlined expression reads: {storage: sources}.

    A storage is inlined when (as Inductor's GraphLowering decides, simplified to the conservative
    side) its producer is a pointwise op, it is no graph output / saved value / input (``pinned``),
    every consumer of it or of a view of it is pointwise or a reduction / indexing load
    (``_FUSING_CONSUMERS``; never an extern kernel such as mm or attention), and it is not stored
    for reuse: with several consumers its expression must read at most ``REALIZE_READS``
    storages and count at most ``REALIZE_OPS`` ops; any expression reading more than ``MAX_READS``
    is stored. Not modelled (so still counted, conservatively): the scheduler's removal of stored
    buffers whose consumers all fuse into one kernel, and in-place buffer reuse."""
    members: dict[Any, list[torch.fx.Node]] = {}
    for n in nodes:
        if n.op == "call_function":
            st = storage(n)
            if st is not None:
                members.setdefault(st, []).append(n)
    inlined: dict[Any, frozenset] = {}
    ops: dict[Any, int] = {}
    for st, group in members.items():
        prod = group[0]
        if st in pinned or not _pointwise(prod):
            continue
        consumers = {u for m in group for u in m.users if u.op != "call_function" or storage(u) != st}
        if not consumers or any(u.op != "call_function" or not (_pointwise(u) or u.target in _FUSING_CONSUMERS)
                                for u in consumers):
            continue
        srcs: set[Any] = set()
        count = 1
        for a in prod.all_input_nodes:
            sa = storage(a)
            if sa in inlined:
                srcs |= inlined[sa]
                count += ops[sa]
            elif sa is not None:
                srcs.add(sa)
        if len(srcs) > MAX_READS or (len(consumers) > 1 and (len(srcs) > REALIZE_READS or count > REALIZE_OPS)):
            continue
        inlined[st], ops[st] = frozenset(srcs), count
    return inlined


def _inplace_scaled(bw: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Backward nodes the ``inplace_saved_grad_scale`` pass will turn into an in-place scale of
    their saved input: {node name: that input (a placeholder)}. The pass's own matcher."""
    from unsloth_fx.passes.inplace_saved_grad_scale import match, saved_input

    return {n.name: saved_input(n) for n in bw.graph.nodes if match(n)}


class _Walker:
    def __init__(self, static: Static, recomputable: set[str]):
        self.tl = Timeline(static=static)
        self.static = static
        self.recomputable = recomputable
        self.live = static.resident
        self.step = 0
        self.cat_live: dict[str, int] = {"parameters": static.parameters + static.buffers,
                                         "optimizer": static.optimizer_state, "inputs": static.inputs}
        if static.workspace or static.block_slack:  # the allocator's own: library workspaces and block slack
            self.cat_live["workspace"] = static.workspace + static.block_slack
        self.bytes: dict[Any, int] = {}  # live storage -> bytes
        self.cat: dict[Any, str] = {}
        self.alias: dict[str, Any] = {}  # backward placeholder name -> forward storage
        self.inlined_count = 0  # storages not materialized (lower="inductor")
        self.owner: dict[Any, torch.fx.Node] = {}  # storage -> the node that allocated it (names free events)
        self.inplace: dict[str, torch.fx.Node] = {}  # backward node name -> the saved input it scales in place

    def storage(self, n: torch.fx.Node) -> Any:
        if n.name in self.inplace:
            return self.storage(self.inplace[n.name])
        if n.op == "placeholder" and n.name in self.alias:
            return self.alias[n.name]
        if not isinstance(n.meta.get("val"), torch.Tensor):
            return None
        s = _compat.node_storage(n)
        return s if s is not None else ("node", n.name)

    def record(self, phase: str, node: Any, kind: str, nbytes: int, cat: str, size: SizeInfo | None = None) -> None:
        sign = 1 if kind == "alloc" else -1
        self.live += sign * nbytes
        self.cat_live[cat] = self.cat_live.get(cat, 0) + sign * nbytes
        isnode = isinstance(node, torch.fx.Node)
        self.tl.events.append(Event(
            self.step, phase, node.name if isnode else str(node), kind, nbytes, self.live, cat, _decision(node),
            source_line(node) if isnode else None,
            str(size.expr) if size is not None and size.expr is not None else None))

    def check_peak(self, phase: str, name: str, extra: int = 0) -> None:
        if self.live + extra > self.tl.peak:
            tl = self.tl
            tl.peak, tl.peak_step, tl.peak_phase, tl.peak_node = self.live + extra, self.step, phase, name
            tl.peak_by_category = {k: v for k, v in self.cat_live.items() if v}
            if extra:
                tl.peak_by_category["workspace"] = extra

    def alloc(self, phase: str, n: torch.fx.Node, s: Any, cat: str) -> None:
        size = storage_size(n.meta["val"])
        if size.unbacked and not any("unbacked" in w for w in self.tl.warnings):
            self.tl.warnings.append(
                f"the size of {n.name} depends on data (unbacked symbol): memory estimated conservatively "
                "from its upper bound")
        nbytes = round_block(size.nbytes)
        self.bytes[s], self.cat[s] = nbytes, cat
        self.owner[s] = n
        self.record(phase, n, "alloc", nbytes, cat, size)

    def free(self, phase: str, node: Any, s: Any) -> None:
        self.record(phase, node, "free", self.bytes.pop(s), self.cat.pop(s, "transient"))

    def walk(self, gm: torch.fx.GraphModule, phase: str, keep: set[Any], saved: set[Any], user_out: set[Any],
             fused: dict[int, list[tuple[torch.fx.Node, int]]] | None = None) -> None:
        nodes = list(gm.graph.nodes)
        out_node = nodes[-1]
        out_stores = {self.storage(a) for a in out_node.all_input_nodes}
        inputs = {self.storage(n) for n in nodes if n.op == "placeholder"}
        inl: dict[Any, frozenset] = {}
        if self.static.lower == "inductor":
            inl = inductor_inlined(nodes, self.storage, keep | saved | user_out | out_stores | inputs)
        self.inlined_count += len(inl)

        def reads(n: torch.fx.Node) -> list[Any]:
            # storages node n really reads: an inlined producer's sources are read by its consumers
            out: dict[Any, None] = {}
            for a in (*n.all_input_nodes, n):
                sa = self.storage(a)
                if sa is None:
                    continue
                for x in (inl[sa] if sa in inl else (sa,)):
                    out[x] = None
            return list(out)

        last: dict[Any, int] = {}
        for i, n in enumerate(nodes):
            for s in reads(n):
                last[s] = i
        for i, n in enumerate(nodes):
            if n.op == "output":
                break
            if n.op == "placeholder":
                s = self.storage(n)
                # tangents and other backward-only inputs arrive as the backward starts
                if phase == "backward" and s is not None and s not in self.bytes and n.name not in self.alias:
                    self.alloc(phase, n, s, "inputs")
                continue
            s = self.storage(n)
            if n.name in self.inplace and s in out_stores and s in self.bytes and self.cat.get(s) != "gradients":
                # an in-place scaled saved tensor that backward returns: from here on it is a gradient
                # (kept through the optimizer step), no longer a saved activation
                b, old = self.bytes[s], self.cat[s]
                self.cat_live[old] -= b
                self.cat_live["gradients"] = self.cat_live.get("gradients", 0) + b
                self.cat[s] = "gradients"
            if s is not None and s not in self.bytes and s not in inputs and s not in inl and n.op == "call_function":
                if phase == "forward":
                    cat = "saved" if s in saved else ("outputs" if s in user_out else "transient")
                else:
                    cat = "gradients" if s in out_stores else (
                        "recomputed" if n.name in self.recomputable else "transient")
                    if n.name in self.recomputable:
                        self.tl.recomputed.append(n.name)
                self.alloc(phase, n, s, cat)
                if cat == "saved":
                    self.tl.saved[n.name] = self.bytes[s]
                    self.tl.saved_bytes += self.bytes[s]
            self.check_peak(phase, n.name, _workspace(n))
            for sa in reads(n):
                if sa not in self.bytes or last.get(sa) != i or sa in keep or sa in out_stores:
                    continue
                self.free(phase, self.owner.get(sa, n), sa)
            for g, temp in (fused or {}).get(i, ()):
                # the fused optimizer update of this gradient's parameter runs here, then frees it
                sg = self.storage(g)
                if sg is None or sg not in self.bytes:
                    continue
                self.record(phase, "fused update " + g.name, "alloc", temp, "optimizer")
                self.check_peak(phase, "fused update " + g.name)
                self.record(phase, "fused update " + g.name, "free", temp, "optimizer")
                self.free(phase, g, sg)
            self.step += 1

    def run(self, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, num_fwd_outputs: int,
            keep_outputs: bool) -> Timeline:
        fw_out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
        user_nodes = [a for a in fw_out[:num_fwd_outputs] if isinstance(a, torch.fx.Node)]
        saved_nodes = [a for a in fw_out[num_fwd_outputs:] if isinstance(a, torch.fx.Node)]
        user_out = {self.storage(a) for a in user_nodes} - {None}
        saved = {self.storage(a) for a in saved_nodes} - {None}
        self.walk(fw, "forward", saved | user_out, saved, user_out)
        if not keep_outputs:
            for s in list(user_out - saved):
                if s in self.bytes:
                    self.free("forward", "outputs", s)
        self.alias = {a.name: self.storage(a) for a in saved_nodes}
        # saved values the backward graph never reads are freed when it starts
        bw_names = {n.name for n in bw.graph.nodes if n.op == "placeholder"}
        for a in saved_nodes:
            s = self.alias[a.name]
            if a.name not in bw_names and s in self.bytes and s not in user_out:
                self.free("backward", a, s)
        fused = _fused_updates(fw, bw, self.static) if self.static.fuse_optimizer else None
        self.inplace = _inplace_scaled(bw) if self.static.inplace_grad_scale else {}
        self.walk(bw, "backward", set(), saved, set(), fused)
        for s in list(self.bytes):
            if self.cat.get(s) != "gradients":
                self.free("backward", "end of backward", s)
        self.step += 1
        self.record("optimizer", "optimizer.step", "alloc", self.static.optimizer_temp, "optimizer")
        self.check_peak("optimizer", "optimizer.step")
        self.record("optimizer", "optimizer.step", "free", self.static.optimizer_temp, "optimizer")
        self.tl.steps = self.step + 1
        return self.tl


# ---------------------------------------------------------------- joint-graph helpers


def forward_nodes(joint: torch.fx.GraphModule, num_fwd_outputs: int | None = None) -> list[torch.fx.Node]:
    """Call nodes that do not depend on any tangent (what the forward graph may compute,
    as the partitioner classifies them), in graph order."""
    bwd: set[torch.fx.Node] = set()
    for n in joint.graph.nodes:
        if (n.op == "placeholder" and "tangents" in n.name) or any(a in bwd for a in n.all_input_nodes):
            bwd.add(n)
    return [n for n in joint.graph.nodes if n.op == "call_function" and n not in bwd]


def inputs_bytes(joint: torch.fx.GraphModule) -> int:
    """Bytes of primal inputs that are not parameters/buffers (token ids, labels)."""
    total = 0
    for n in joint.graph.nodes:
        if n.op == "placeholder" and "tangents" not in n.name:
            rec = n.meta.get("ufx")
            if rec is None or rec.param is None:
                total += round_block(storage_size(n.meta.get("val")).nbytes)
    return total


def static_from_graph(joint: torch.fx.GraphModule, optimizer: str = "adamw", fuse_optimizer: bool = False,
                      params: dict[int, Any] | None = None, lower: str = "eager",
                      fuse_group_bytes: int | None = None, inplace_grad_scale: bool = True) -> Static:
    """Static bytes of the graph's parameters (placeholders named as parameters). ``lower``: the
    backend's lowering, recorded in ``Static.lower`` (``"inductor"``: model Inductor's fusion).
    ``fuse_group_bytes``: see :func:`static_breakdown`. ``inplace_grad_scale``: whether the
    ``inplace_saved_grad_scale`` backward pass will run (``Static.inplace_grad_scale``)."""
    rows = []
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        info = params.get(i) if params else None
        rec = n.meta.get("ufx")
        if info is None and (rec is None or rec.param is None):
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        is_buffer = bool(info.is_buffer) if info is not None else bool(rec.notes.get("buffer", False))
        requires_grad = bool(info.requires_grad) if info is not None else not is_buffer
        name = getattr(info, "name", None) if info is not None else None
        if name is None and rec is not None:
            name = rec.param
        shape = tuple(h if h is not None else 1 for h in (_compat.symint_hint(d)[0] for d in val.shape))
        rows.append((storage_size(val).nbytes // max(val.element_size(), 1), val.dtype, requires_grad, is_buffer,
                     name, shape))
    s = static_breakdown(rows, optimizer, fuse_optimizer, fuse_group_bytes=fuse_group_bytes)
    s.inputs = inputs_bytes(joint)
    s.lower = lower
    s.inplace_grad_scale = bool(inplace_grad_scale)
    if lower == "inductor":
        s.assumptions.append("lower=inductor: pointwise chains Inductor fuses into their consumers are not "
                             "materialized (inductor_inlined); other buffer reuse is not credited")
    return s


def predict(joint: torch.fx.GraphModule, num_fwd_outputs: int, static: Static, *, how: str = "min_cut",
            keep_outputs: bool = False) -> Timeline:
    """Partition ``joint`` as the backend would and predict the step's timeline."""
    fw, bw = partition(joint, num_fwd_outputs, how)
    rec = {n.name for n in forward_nodes(joint, num_fwd_outputs)}
    return simulate(fw, bw, num_fwd_outputs, static, recomputable=rec, keep_outputs=keep_outputs)


def copy_static(s: Static, **kw: Any) -> Static:
    out = copy.copy(s)
    for k, v in kw.items():
        setattr(out, k, v)
    return out
