"""Pass `offload_activations` (forward stage) and its backward half `reload_activations`
(passes/reload_activations.py): carry out the memory plan's "offload" decisions.

For every activation the plan offloads (``ufx(node).decision == "offload"`` on the
forward graph's saved output, copied there from the joint graph by the
partitioner) the forward graph returns a host copy instead of the device tensor::

    relu = aten.relu(x); ...last forward use of relu...
    relu_offload = unsloth_fx.offload_activation(relu)      # device -> pinned host
    return (out, relu_offload, ...)                          # was (out, relu, ...)

so the device tensor dies after its last forward use, and the backward graph
copies it back ahead of its first use::

    relu_offload = placeholder                               # the host copy
    relu_reload = unsloth_fx.reload_activation(relu_offload, cuda:0)   # prefetch point
    ... compute that hides the transfer ...
    relu_await = unsloth_fx.await_activation(relu_reload)    # right before first use
    mm = aten.mm(..., relu_await)

The prefetch point is the latest position whose estimated compute up to the
first use (``schedule.node_seconds``) covers the H2D time (bytes / h2d rate).
On CUDA the copy-out runs on the compute stream into a pinned host buffer
(asynchronous to the host, but in stream order: it is not hidden behind compute),
and the copy-in on a side stream (per device), so it overlaps compute;
``await_activation`` makes the compute stream wait for the copy-in.

Why the copy-out is not on the side stream: Inductor reuses a dead buffer's
memory inside the compiled graph (``buf5 = buf2; del buf2  # reuse``) without
going through the caching allocator, so ``record_stream`` cannot hold it; the
next kernel then overwrote the activation while the side stream was still
copying it out. Step 1 was right and later steps read corrupted activations: on
r1-distill-qwen-1.5b at 7 GiB the loss after 100 steps was +6.6% off stock AMP
with offload and +2.0% without (docs/benchmarks.md, fifth session).

Elsewhere (CPU) host and device are the same memory: the ops copy, so graph
structure and numerics can be tested.

The transforms :func:`offload_forward` / :func:`reload_backward` are also used
by the scheduler on partitioned copies, so the predicted timeline is the
timeline of the graphs that run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import PassContext, PassResult, graph_pass, ufx

# ---------------------------------------------------------------- runtime ops

_STREAMS: dict[Any, Any] = {}
_PENDING: dict[int, Any] = {}  # data_ptr of a reloaded tensor -> CUDA event of its copy-in


def _side_stream(device: torch.device) -> Any:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


@torch.library.custom_op("unsloth_fx::offload_activation", mutates_args=())
def offload_activation(x: torch.Tensor) -> torch.Tensor:
    """Copy ``x`` to host memory (pinned, asynchronous to the host and in the compute stream's order, on CUDA)."""
    if x.device.type != "cuda":
        return x.clone()  # host is the device: a copy keeps the graph's shape
    host = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu", pin_memory=True)
    # on the compute stream: the kernels after it may write x's memory (see the module doc)
    host.copy_(x, non_blocking=True)
    return host


@offload_activation.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")


@torch.library.custom_op("unsloth_fx::reload_activation", mutates_args=())
def reload_activation(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start copying ``host`` back to ``device``; pair with ``await_activation`` before use."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device).clone() if host.device == device else host.to(device)
    cur = torch.cuda.current_stream(device)
    side = _side_stream(device)
    out = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)  # owned by cur
    side.wait_stream(cur)  # out's block may still be read by earlier kernels; the copy-out ran on side
    with torch.cuda.stream(side):
        out.copy_(host, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(side)
    _PENDING[out.data_ptr()] = ev
    return out


@reload_activation.register_fake
def _(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)


# await returns its input (an alias), which custom_op forbids: define it with an aliasing schema.
_LIB = torch.library.Library("unsloth_fx", "FRAGMENT")
_LIB.define("await_activation(Tensor(a) x) -> Tensor(a)")


def _await_impl(x: torch.Tensor) -> torch.Tensor:
    ev = _PENDING.pop(x.data_ptr(), None) if x.device.type == "cuda" else None
    if ev is not None:
        torch.cuda.current_stream(x.device).wait_event(ev)
    return x


_LIB.impl("await_activation", _await_impl, "CompositeExplicitAutograd")
torch.library.register_fake("unsloth_fx::await_activation", lib=_LIB)(lambda x: x)

OFFLOAD = torch.ops.unsloth_fx.offload_activation.default
RELOAD = torch.ops.unsloth_fx.reload_activation.default
AWAIT = torch.ops.unsloth_fx.await_activation.default


# ---------------------------------------------------------------- graph transforms


def _storage(n: torch.fx.Node) -> Any:
    return _compat.node_storage(n) if isinstance(n.meta.get("val"), torch.Tensor) else None


def offloadable(n: torch.fx.Node) -> bool:
    """A forward value the ops can move: a contiguous tensor that owns its storage (not a view)."""
    val = n.meta.get("val")
    if n.op != "call_function" or not isinstance(val, torch.Tensor) or n.target in (OFFLOAD, RELOAD, AWAIT):
        return False
    try:
        if not val.is_contiguous():
            return False
    except Exception:  # a symbolic layout we cannot decide
        return False
    s = _storage(n)
    return s is None or all(_storage(a) != s for a in n.all_input_nodes)


def offload_forward(fw: torch.fx.GraphModule, num_fwd_outputs: int,
                    names: set[str] | None = None) -> dict[str, str]:
    """Offload saved outputs of ``fw`` in place. ``names``: which (None: those whose
    ``ufx`` decision is "offload"). Skips values that are also user outputs, views,
    and values another saved output aliases. Returns {saved name: offload node name}."""
    g = fw.graph
    out = next(n for n in g.nodes if n.op == "output")
    outs = list(out.args[0])
    user = {a for a in outs[:num_fwd_outputs] if isinstance(a, torch.fx.Node)}
    order = {n: i for i, n in enumerate(g.nodes)}
    done: dict[str, str] = {}
    for k in range(num_fwd_outputs, len(outs)):
        n = outs[k]
        if not isinstance(n, torch.fx.Node) or n in user:
            continue
        rec = n.meta.get("ufx")
        want = n.name in names if names is not None else (rec is not None and rec.decision == "offload")
        if not want or not offloadable(n):
            continue
        s = _storage(n)
        if s is not None and any(isinstance(o, torch.fx.Node) and o is not n and _storage(o) == s for o in outs):
            continue  # another output keeps the storage alive: moving this one frees nothing
        # last forward use, views of n included (they keep its storage alive)
        last, stack, seen = n, [n], {n}
        while stack:
            for u in stack.pop().users:
                if u.op == "output" or u in seen:
                    continue
                seen.add(u)
                last = u if order[u] > order[last] else last
                if s is not None and _storage(u) == s:
                    stack.append(u)
        with g.inserting_after(last):
            off = g.create_node("call_function", OFFLOAD, (n,), {}, name=f"{n.name}_offload")
        off.meta["val"] = OFFLOAD(n.meta["val"])
        ufx(off).decision = "offload"
        ufx(off).notes["offload_of"] = n.name
        outs[k] = off
        done[n.name] = off.name
    if done:
        out.args = (tuple(outs),) + tuple(out.args[1:])
        fw.recompile()
    return done


def prefetch_index(nodes: list[torch.fx.Node], first_use: int, seconds: float, dev: Any) -> int:
    """Index to insert a reload at: the latest one whose compute up to ``first_use``
    (estimated by ``schedule.node_seconds``) is at least ``seconds``, never before
    the first non-placeholder node."""
    from unsloth_fx.memory.schedule import node_seconds

    start = next((i for i, n in enumerate(nodes) if n.op != "placeholder"), len(nodes))
    i, acc = first_use, 0.0
    while i > start and acc < seconds:
        i -= 1
        if nodes[i].op == "call_function" and nodes[i].target not in (RELOAD, AWAIT):
            acc += node_seconds(nodes[i], dev)
    return i


def reload_backward(bw: torch.fx.GraphModule, offloaded: dict[str, str], dev: Any = None) -> list[str]:
    """For each backward placeholder named in ``offloaded`` (saved name -> offload node
    name): rename it to the offload node's name (host value), reload it at the prefetch
    point and await it right before its first use. Returns the saved names reloaded."""
    from unsloth_fx.memory.schedule import DeviceModel

    dev = dev or DeviceModel()
    g = bw.graph
    done: list[str] = []
    for p in [n for n in g.nodes if n.op == "placeholder" and n.name in offloaded]:
        val = p.meta.get("val")
        with g.inserting_after(p):
            host = g.placeholder(offloaded[p.name])
        host.meta.update(p.meta)
        host.meta["val"] = OFFLOAD(val) if isinstance(val, torch.Tensor) else val
        p.replace_all_uses_with(host)
        g.erase_node(p)
        done.append(p.name)
        if not host.users or not isinstance(val, torch.Tensor):
            continue
        nodes = list(g.nodes)
        first = min(nodes.index(u) for u in host.users)
        nbytes = _hint_bytes(val)
        at = prefetch_index(nodes, first, nbytes / dev.h2d_bytes_per_s, dev)
        with g.inserting_before(nodes[at]):
            rl = g.create_node("call_function", RELOAD, (host, val.device), {}, name=f"{p.name}_reload")
        with g.inserting_before(nodes[first]):
            aw = g.create_node("call_function", AWAIT, (rl,), {}, name=f"{p.name}_await")
        rl.meta["val"] = RELOAD(host.meta["val"], val.device)
        aw.meta["val"] = rl.meta["val"]  # the same tensor: the walker sees one storage
        for n in (rl, aw):
            ufx(n).decision = "offload"
            ufx(n).notes["offload_of"] = p.name
        for u in list(host.users):
            if u is not rl:
                u.replace_input_with(host, aw)
    if done:
        bw.recompile()
    return done


def _hint_bytes(val: torch.Tensor) -> int:
    from unsloth_fx.memory.model import storage_size

    return storage_size(val).nbytes


# ---------------------------------------------------------------- the pass


@graph_pass(name="offload_activations", stage="forward")
def offload_activations(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Return host copies of the saved activations the memory plan offloads (see reload_activations)."""
    nfwd = ctx.num_fwd_outputs or 1
    done = offload_forward(gm, nfwd)
    if done:
        ctx.shared.setdefault("offloaded", {}).update(done)
    nbytes = 0
    for n in gm.graph.nodes:
        if n.target is OFFLOAD:
            nbytes += _hint_bytes(n.meta["val"])
    return PassResult(gm, bool(done), {"offloaded": sorted(done), "offloaded_bytes": nbytes})
