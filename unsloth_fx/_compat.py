"""Every private torch API unsloth-fx touches, one function each.

Private APIs move between torch releases; an upgrade should touch this file
only. Supported: torch 2.11 through 2.14.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Iterator

import torch

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def aot_autograd(**kwargs: Any) -> Callable[..., Any]:
    """AOTAutograd as a Dynamo backend (fw/bw/inference compilers, partition_fn, decompositions)."""
    from torch._dynamo.backends.common import aot_autograd as _aot

    return _aot(**kwargs)


def inductor_decompositions() -> dict[Any, Callable[..., Any]]:
    """The decomposition table Inductor traces with."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def inductor_partition(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Inductor's partition function: its joint-graph passes, then the min-cut partitioner."""
    from torch._inductor.compile_fx import partition_fn

    return partition_fn(gm, joint_inputs, **kwargs)


def lazy_graph_modules() -> contextlib.AbstractContextManager[None]:
    """Inside, :func:`graph_module` and torch's partitioners make GraphModules that write their
    Python code only when run or printed (Inductor's own trick). The planner partitions the step
    to walk its graphs, never to run them, and writing the code of a 26,000-node graph takes seconds."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    return _use_lazy_graph_module(True)


def graph_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule(root, graph)``, lazy inside :func:`lazy_graph_modules`."""
    from torch.fx._lazy_graph_module import _make_graph_module

    return _make_graph_module(root, graph)


def min_cut_partition(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[Any, Any]:
    """torch's min-cut rematerialization partitioner (honours ``meta["recompute"]`` tags)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Callable[..., Any]:
    """Lower one forward/backward/inference graph with Inductor (boxed calling convention)."""
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs, **kwargs)


def inductor_compile_whole(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
    """Lower a whole graph that needs no AOT split (compiled autograd's backward) with Inductor."""
    from torch._inductor import compile as compile_whole

    return compile_whole(gm, example_inputs)


def make_boxed(fn: Callable[..., Any]) -> Callable[..., Any]:
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def in_compiled_autograd() -> bool:
    """True while compiled autograd is handing its backward graph to the backend."""
    try:
        from torch._dynamo import compiled_autograd
    except ImportError:  # pragma: no cover
        return False
    flag = getattr(compiled_autograd, "in_compiled_autograd_region", False)
    return bool(flag() if callable(flag) else flag)


def is_compiled_autograd_graph(gm: torch.fx.GraphModule) -> bool:
    """Compiled autograd names its graph ``CompiledAutograd...``; its Dynamo
    re-trace keeps the name in the graph module's class or code."""
    name = type(gm).__name__ + getattr(gm, "_get_name", lambda: "")()
    return in_compiled_autograd() or "CompiledAutograd" in name


def placeholder_source_name(node: torch.fx.Node) -> str | None:
    """The Dynamo source of a graph input, e.g. ``L['self']._modules['lm_head']._parameters['weight']``."""
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    if src is None:
        return None
    try:
        return src.name() if callable(src.name) else src.name  # torch >= 2.12 made name a property
    except Exception:  # pragma: no cover - defensive: sources are internal
        return None


def example_value(node: torch.fx.Node) -> Any:
    """The fake value of a node: ``meta["val"]`` in AOT graphs, ``meta["example_value"]`` in Dynamo graphs."""
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def detect_fake_mode(inputs: Any) -> Any:
    from torch._guards import detect_fake_mode as _detect

    return _detect(inputs)


@contextlib.contextmanager
def no_autograd_cache() -> Iterator[None]:
    """Turn off AOTAutograd's cache: a hit would skip our joint-graph passes
    (and their dumps). Inductor's FX-graph cache stays on: it keys on the
    graphs after our passes."""
    import torch._functorch.config as fconfig

    if hasattr(fconfig, "enable_autograd_cache"):
        with fconfig.patch(enable_autograd_cache=False):
            yield
    else:  # pragma: no cover
        yield


def placeholder_example(node: torch.fx.Node) -> Any:
    """The real tensor behind a Dynamo graph input (a parameter, say), or None."""
    arg = node.meta.get("grapharg")
    if arg is None:
        return None
    try:
        ex = arg.example
    except Exception:  # the weak reference may be dead, or the input is symbolic
        return None
    return ex if isinstance(ex, torch.Tensor) and not is_fake(ex) else None


def trace_artifact(name: str, payload: str, encoding: str = "string") -> None:
    """Emit an artifact to torch's structured trace (``TORCH_TRACE`` + tlparse)."""
    try:
        from torch._logging import trace_structured
    except ImportError:  # pragma: no cover
        return
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"unsloth_fx_{name}", "encoding": encoding},
        payload_fn=lambda: payload,
    )


def checkpoint_policy() -> Any:
    """The enum the min-cut partitioner reads from ``node.meta["recompute"]``."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy


@functools.cache
def fake_tensor_mode_cls() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode


def is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# --- memory model (issue 3) -------------------------------------------------


def default_partition(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[Any, Any]:
    """torch's default partitioner: saves every forward value backward needs, recomputes nothing."""
    from torch._functorch.partitioners import default_partition as _dp

    return _dp(gm, joint_inputs, **kwargs)


def node_storage(node: torch.fx.Node) -> int | None:
    """Identity of the storage behind a node's ``meta["val"]`` (views share it), as the partitioner uses."""
    from torch._inductor.fx_utils import get_node_storage

    try:
        return get_node_storage(node)
    except Exception:  # fake tensors without storage (sparse, nested): treat as its own storage
        return None


def fwd_bwd_outputs(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> tuple[list[Any], list[Any]]:
    """The joint graph's forward outputs and backward outputs (gradients)."""
    from torch._functorch.partitioners import _extract_fwd_bwd_outputs

    out = _extract_fwd_bwd_outputs(joint, num_fwd_outputs=num_fwd_outputs)
    return list(out[0]), list(out[1])


def aot_trace_joint(fn: Callable[..., Any], args: list[Any],
                    decompositions: dict[Any, Callable[..., Any]] | None = None) -> tuple[torch.fx.GraphModule, int]:
    """Trace ``fn(*args) -> loss`` with AOTAutograd and return (joint graph, num_fwd_outputs)
    without partitioning or compiling anything. ``args`` may be fake tensors; ``decompositions``:
    a table applied while tracing (none by default)."""
    from torch._functorch.aot_autograd import aot_function

    class _Captured(Exception):
        pass

    got: dict[str, Any] = {}

    def capture(joint: torch.fx.GraphModule, _inputs: Any, *, num_fwd_outputs: int, **_kw: Any):
        got["joint"], got["n"] = joint, num_fwd_outputs
        raise _Captured

    f = aot_function(fn, fw_compiler=lambda g, _i: g, partition_fn=capture, decompositions=decompositions or {})
    with no_autograd_cache():
        try:
            f(*args)
        except _Captured:
            pass
    if "joint" not in got:
        raise RuntimeError("AOTAutograd did not produce a joint graph (does the function need gradients?)")
    return got["joint"], got["n"]


def symint_hint(x: Any) -> tuple[int | None, Any]:
    """(size hint or None when unbacked, sympy expression) of a SymInt; ints pass through."""
    if isinstance(x, int):
        return x, x
    node = getattr(x, "node", None)
    expr = getattr(node, "expr", None)
    hint = getattr(node, "hint", None)
    if hint is None and node is not None:
        try:
            hint = node.shape_env.size_hint(expr, allow_none=True)
        except Exception:
            hint = None
    return (int(hint) if hint is not None else None), expr


def enable_compiled_autograd(compiler: Callable[..., Any]) -> Any:
    """Context manager: run ``.backward()`` through compiled autograd with ``compiler``."""
    from torch._dynamo import compiled_autograd

    return compiled_autograd._enable(compiler)


# --- fuse_optimizer (issue 6) ------------------------------------------------


def tag_must_be_in_backward(node: torch.fx.Node) -> None:
    """Tell the min-cut partitioner a (mutating) joint-graph node belongs to backward;
    untagged mutating ops are forced into the forward graph (``_must_be_in_forward``)."""
    node.meta["partitioner_tag"] = "must_be_in_backward"


def unset_fake_mode() -> Any:
    """Context manager: leave the ambient fake mode (the joint stage runs under one) to compute on real tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


# Graph-target types and pattern keys (private modules, public in practice).
OpOverload = torch._ops.OpOverload
LINEAR_TARGETS = frozenset({torch._C._nn.linear, torch.nn.functional.linear})


def dispatch_mode_active() -> bool:
    """Whether any TorchDispatchMode (fake, proxy/make_fx, functionalization) is on the stack:
    then a call must go through the registered op so the mode sees it. Private in torch 2.11-2.14."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def inductor_output_code(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """(fn(*args, **kwargs), the Python source of every graph Inductor lowered meanwhile).
    Resets Dynamo first. Private in torch 2.11-2.14 (``torch._inductor.utils.run_and_get_code``)."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args, **kwargs)


def aot_trace_joint_decomposed(fn: Callable[..., Any], args: list[Any],
                               decompositions: dict[Any, Callable[..., Any]] | None = None
                               ) -> tuple[torch.fx.GraphModule, int]:
    """:func:`aot_trace_joint` with a decomposition table (e.g. :func:`inductor_decompositions`, the
    table the backend traces with when ``lower="inductor"``)."""
    return aot_trace_joint(fn, args, decompositions)


def record_memory_history(enabled: bool, max_entries: int = 100_000) -> None:
    """Start (with Python stacks) or stop recording the CUDA caching allocator's history.
    Private in torch 2.11-2.14 (``torch.cuda.memory._record_memory_history``)."""
    torch.cuda.memory._record_memory_history("all" if enabled else None, stacks="python", max_entries=max_entries)


def memory_snapshot() -> dict[str, Any]:
    """The CUDA allocator snapshot (segments and ``device_traces``) recorded so far.
    Private in torch 2.11-2.14 (``torch.cuda.memory._snapshot``)."""
    return torch.cuda.memory._snapshot()


def foreach_norm_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 L2 norm (0-d) of each tensor, in one multi-tensor call where torch has it
    (``torch._foreach_norm(..., dtype=torch.float32)``: one or a few launches on CUDA,
    no fp32 copy of a bf16 tensor); otherwise one ``vector_norm`` per tensor."""
    fn = getattr(torch, "_foreach_norm", None)
    if fn is not None and tensors:
        try:
            return list(fn(tensors, 2, dtype=torch.float32))
        except (TypeError, RuntimeError):  # an older signature without dtype, or mixed devices
            pass
    return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


def foreach_add_(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``tensors[k].add_(others[k])`` for every k, in one multi-tensor call where torch has it."""
    fn = getattr(torch, "_foreach_add_", None)
    if fn is not None:
        try:
            fn(tensors, others)
            return
        except (TypeError, RuntimeError):
            pass
    for t, o in zip(tensors, others):
        t.add_(o)


def foreach_mul(tensors: list[torch.Tensor], scalars: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[t * s for t, s in zip(tensors, scalars)]`` (``scalars``: 0-d tensors of each tensor's
    dtype), in one multi-tensor call where torch has it."""
    fn = getattr(torch, "_foreach_mul", None)
    if fn is not None:
        try:
            return list(fn(tensors, scalars))
        except (TypeError, RuntimeError):
            pass
    return [t * s for t, s in zip(tensors, scalars)]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata copied shallowly; attributes shared).
    Private: ``Graph._codegen`` (the pytree in/out specs) is copied too."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # pytree in/out specs, where the graph has them
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = graph.graph_copy(gm.graph, {})
    graph.output(out, type_expr=old_out.type).meta.update(old_out.meta)
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new
