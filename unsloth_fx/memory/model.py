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
from unsloth_fx.pass_base import ufx

BLOCK = 512  # CUDA caching allocator block rounding (bytes)

# Optimizer state in bytes per trainable parameter, and the temporaries of one
# step (bytes per parameter) for the stock foreach implementation.
OPTIMIZER_STATE = {
    "adamw": 8.0,  # two fp32 moments
    "adamw-bf16": 4.0,  # two bf16 moments (torch.optim.AdamW on bf16 parameters)
    "hybrid": 2.0,  # HybridAdamW, mostly 8-bit blockwise moments (approximate)
    "int8": 2.0,
    "int4": 1.0,
    "sgd": 0.0,
}
# torch's foreach AdamW materializes sqrt(v) for every parameter at once.
OPTIMIZER_STEP_TEMP = {"adamw": 4.0, "adamw-bf16": 2.0, "hybrid": 0.0, "int8": 0.0, "int4": 0.0, "sgd": 0.0}


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
    num_params: int = 0
    optimizer: str = "adamw"
    fuse_optimizer: bool = False

    @property
    def resident(self) -> int:
        """Bytes alive during the whole step (before gradients appear)."""
        return self.parameters + self.buffers + self.optimizer_state + self.inputs


def static_breakdown(
    params: Iterable[tuple[int, torch.dtype, bool, bool]],
    optimizer: str = "adamw",
    fuse_optimizer: bool = False,
) -> Static:
    """``params``: (numel, dtype, requires_grad, is_buffer) per tensor. Each tensor
    is a separate allocation, so each is rounded to a block."""
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZER_STATE)}")
    s = Static(optimizer=optimizer, fuse_optimizer=fuse_optimizer)
    biggest_grad = 0
    for numel, dtype, requires_grad, is_buffer in params:
        nbytes = round_block(int(numel) * _itemsize(dtype))
        if is_buffer:
            s.buffers += nbytes
            continue
        s.parameters += nbytes
        if not requires_grad:
            continue
        s.num_params += int(numel)
        biggest_grad = max(biggest_grad, nbytes)
        s.gradients += nbytes
        s.optimizer_state += round_block(int(numel * OPTIMIZER_STATE[optimizer]))
        s.optimizer_temp += round_block(int(numel * OPTIMIZER_STEP_TEMP[optimizer]))
    if fuse_optimizer:
        # The update runs inside backward: one parameter's gradient at a time.
        s.gradients, s.optimizer_temp = 0, biggest_grad
    return s


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
    gm = torch.fx.GraphModule(joint, g)
    primals, tangents = [], []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            (tangents if "tangents" in n.name else primals).append(n.meta.get("val"))
    fn = _compat.min_cut_partition if how == "min_cut" else _compat.default_partition
    return fn(gm, [primals, tangents], num_fwd_outputs=num_fwd_outputs)


_WORKSPACE_OPS = ("_efficient_attention_backward", "_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
                  "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_cudnn_attention_backward")


def _workspace(node: torch.fx.Node) -> int:
    """Bytes a kernel allocates internally for the duration of one op (not graph values).
    Flash / memory-efficient attention backward accumulate dQ in fp32: ~ q.numel() * 4."""
    name = getattr(node.target, "__name__", str(node.target))
    if any(name.startswith(op) for op in _WORKSPACE_OPS):
        q = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) else None
        if isinstance(q, torch.Tensor):
            return round_block(storage_size(q).nbytes * 4 // max(q.element_size(), 1))
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


class _Walker:
    def __init__(self, static: Static, recomputable: set[str]):
        self.tl = Timeline(static=static)
        self.static = static
        self.recomputable = recomputable
        self.live = static.resident
        self.step = 0
        self.cat_live: dict[str, int] = {"parameters": static.parameters + static.buffers,
                                         "optimizer": static.optimizer_state, "inputs": static.inputs}
        self.bytes: dict[Any, int] = {}  # live storage -> bytes
        self.cat: dict[Any, str] = {}
        self.alias: dict[str, Any] = {}  # backward placeholder name -> forward storage

    def storage(self, n: torch.fx.Node) -> Any:
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
        self.record(phase, n, "alloc", nbytes, cat, size)

    def free(self, phase: str, node: Any, s: Any) -> None:
        self.record(phase, node, "free", self.bytes.pop(s), self.cat.pop(s, "transient"))

    def walk(self, gm: torch.fx.GraphModule, phase: str, keep: set[Any], saved: set[Any], user_out: set[Any]) -> None:
        nodes = list(gm.graph.nodes)
        out_node = nodes[-1]
        out_stores = {self.storage(a) for a in out_node.all_input_nodes}
        inputs = {self.storage(n) for n in nodes if n.op == "placeholder"}
        last: dict[Any, int] = {}
        for i, n in enumerate(nodes):
            for a in (*n.all_input_nodes, n):
                s = self.storage(a)
                if s is not None:
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
            if s is not None and s not in self.bytes and s not in inputs and n.op == "call_function":
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
            for a in dict.fromkeys((*n.all_input_nodes, n)):
                sa = self.storage(a)
                if sa is None or sa not in self.bytes or last.get(sa) != i or sa in keep or sa in out_stores:
                    continue
                self.free(phase, a, sa)
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
        self.walk(bw, "backward", set(), saved, set())
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
                      params: dict[int, Any] | None = None) -> Static:
    """Static bytes of the graph's parameters (placeholders named as parameters)."""
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
        rows.append((storage_size(val).nbytes // max(val.element_size(), 1), val.dtype, requires_grad, is_buffer))
    s = static_breakdown(rows, optimizer, fuse_optimizer)
    s.inputs = inputs_bytes(joint)
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
