"""The ``unsloth`` torch.compile backend.

Flow for one Dynamo graph::

    Dynamo graph --pre_grad passes--> AOTAutograd traces the joint fwd+bwd graph
      --joint passes--> partition (torch's min-cut, honouring meta["recompute"] tags)
      --forward / backward passes--> lower (Inductor, or eager for debugging)

Graphs traced without gradients go through the ``inference`` stage instead.
Graphs that compiled autograd hands over are lowered without training passes.

Found through the ``torch_dynamo_backends`` entry point, so
``torch.compile(m, backend="unsloth")`` needs no import. This module must not
register the backend itself at import: the entry-point loader registers the
function it loads, and a second registration under the same name is an error.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.dump import Dumper
from unsloth_fx.options import Options
from unsloth_fx.pass_base import ParamInfo, PassContext, ufx
from unsloth_fx.pipeline import Pipeline, announce, run_stage

_graph_ids = itertools.count()

# The last compile's context (PassContext, joint/forward/backward graphs, dump dir), for tests and tools.
LAST: dict[str, Any] = {}
# Graphs lowered without training passes because compiled autograd handed them over.
COMPILED_AUTOGRAD_GRAPHS: list[torch.fx.GraphModule] = []

_SEG_RE = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]|\['([^']+)'\]")


_ROOT_RE = re.compile(r"^(?:L|G)\['[^']+'\](?:\[\d+\])?")


def source_to_fqn(source: str) -> str | None:
    """``L['self']._modules['lm_head']._parameters['weight']`` -> ``lm_head.weight``.

    The root is the module Dynamo was called on (``L['self']``, ``L['fn']``,
    or ``L['args'][0]`` when a wrapper passes the module positionally)."""
    m = _ROOT_RE.match(source)
    if m is None:
        return None
    parts = [next(g for g in seg.groups() if g is not None) for seg in _SEG_RE.finditer(source[m.end():])]
    return ".".join(parts) if parts else None


def param_infos(gm: torch.fx.GraphModule) -> dict[int, ParamInfo]:
    """Which of a Dynamo graph's inputs are module parameters or buffers."""
    out: dict[int, ParamInfo] = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        src = _compat.placeholder_source_name(node)
        if src is None or ("_parameters[" not in src and "_buffers[" not in src):
            continue
        fqn = source_to_fqn(src)
        if fqn is None:
            continue
        val = _compat.example_value(node)
        real = _compat.placeholder_example(node)
        out[i] = ParamInfo(
            name=fqn,
            index=i,
            shape=tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else (),
            dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32,
            requires_grad=bool(getattr(real if real is not None else val, "requires_grad", False)),
            is_buffer="_buffers[" in src,
            tensor=real,
        )
        ufx(node).param = fqn
    return out


def _device_of(inputs: list[Any]) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _lower(opts: Options, gm: torch.fx.GraphModule, inputs: Any, **kwargs: Any) -> Callable[..., Any]:
    if opts.lower == "eager":
        gm.recompile()
        return _compat.make_boxed(gm)
    # Inductor's post-grad passes rewrite the graph they are given in place, and only on an FX-graph-cache
    # miss; lowering a copy keeps the pipeline's graph (LAST, dumps, checkers) the same either way.
    return _compat.inductor_compile(_compat.copy_graph_module(gm), inputs, **kwargs)


def unsloth(gm: torch.fx.GraphModule, example_inputs: list[Any], *, options: dict[str, Any] | None = None,
            mode: str | None = None) -> Callable[..., Any]:
    """The backend: ``torch.compile(model, backend="unsloth", options={...})``."""
    opts = Options.from_user(options)
    if mode not in (None, "default"):
        warnings.warn(f"unsloth backend: mode={mode!r} is not used; options= controls this backend", stacklevel=2)

    if _compat.is_compiled_autograd_graph(gm):
        # Compiled autograd's backward graph: lower it, nothing to plan.
        COMPILED_AUTOGRAD_GRAPHS.append(gm)
        if opts.lower == "eager":
            return gm.forward
        return _compat.inductor_compile_whole(gm, example_inputs)

    graph_id = next(_graph_ids)
    pipeline = Pipeline.parse(opts.pipeline)
    ctx = PassContext(
        options=opts,
        params=param_infos(gm),
        example_inputs=list(example_inputs),
        device=_device_of(example_inputs),
        graph_id=graph_id,
    )
    dumper = None
    if opts.dump or os.environ.get("TORCH_TRACE"):
        dumper = Dumper(opts.dump, graph_id, str(pipeline), [f"{s.stage}:{s.name}" for s, _ in pipeline.passes()])
    LAST.clear()
    LAST.update(ctx=ctx, pipeline=pipeline, dump_dir=dumper.dir if dumper else None)

    gm = run_stage(pipeline, "pre_grad", gm, ctx, dumper)
    t_trace = time.perf_counter()

    def partition(joint: torch.fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kw: Any):
        announce(ctx, f"joint trace ({len(joint.graph.nodes)} nodes)", time.perf_counter() - t_trace)
        ctx.num_fwd_outputs = num_fwd_outputs
        _mark_joint_params(joint, ctx)
        joint = run_stage(pipeline, "joint", joint, ctx, dumper)
        joint.recompile()
        part = _compat.inductor_partition if opts.lower == "inductor" else _compat.min_cut_partition
        t0 = time.perf_counter()
        fw, bw = part(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)
        announce(ctx, "partition", time.perf_counter() - t0)
        LAST["joint"] = joint
        return fw, bw

    def stage_compiler(stage: str) -> Callable[..., Any]:
        def compile_stage(g: torch.fx.GraphModule, inputs: Any, **kw: Any) -> Callable[..., Any]:
            g = run_stage(pipeline, stage, g, ctx, dumper)
            LAST[stage] = g
            if dumper is not None:
                dumper.final(stage, g)
                dumper.finish(ctx)
            extra = {"is_backward": stage == "backward", "is_inference": stage == "inference", "graph_id": graph_id}
            t0 = time.perf_counter()
            out = _lower(opts, g, inputs, **extra)
            announce(ctx, f"{stage} lowered ({opts.lower})", time.perf_counter() - t0)
            return out

        return compile_stage

    backend = _compat.aot_autograd(
        fw_compiler=stage_compiler("forward"),
        bw_compiler=stage_compiler("backward"),
        inference_compiler=stage_compiler("inference"),
        partition_fn=partition,
        decompositions=decompositions(opts.lower),
        keep_inference_input_mutations=True,
    )
    with _compat.no_autograd_cache():
        compiled = backend(gm, example_inputs)
    if dumper is not None:
        dumper.finish(ctx)
    return compiled


def decompositions(lower: str) -> dict[Any, Callable[..., Any]]:
    """The decomposition table AOTAutograd traces with for ``lower``: Inductor's table for
    ``"inductor"``, with ``aten.embedding_dense_backward`` routed to
    ``torch.ops.unsloth_fx.embedding_dense_backward`` (Inductor's own decomposition sums in a
    ``vocab x hidden`` fp32 buffer; see runtime/embedding_backward.py); none for ``"eager"``
    (torch's kernels)."""
    if lower != "inductor":
        return {}
    from unsloth_fx.runtime.embedding_backward import with_decomposition

    return with_decomposition(_compat.inductor_decompositions())


def _mark_joint_params(joint: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Copy parameter names onto the joint graph's primal placeholders (same order as the Dynamo inputs)."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    for i, info in ctx.params.items():
        if i < len(placeholders) and placeholders[i].name.startswith("primals"):
            ufx(placeholders[i]).param = info.name
