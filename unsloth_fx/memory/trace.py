"""Trace a model's training step to a joint graph on fake tensors (no GPU, no weights).

The model is built on ``meta`` (unsloth_fx.zoo), then every parameter and buffer
is replaced by a fake CPU tensor of the training dtype, and AOTAutograd traces
``loss = model(input_ids, labels=input_ids).loss`` with gradients for every
parameter. Two adjustments make the CPU trace match what the CUDA step runs:

* transformers' mask helpers see "tracing", exactly as under Dynamo (so the same
  mask tensors appear as in a compiled step);
* ``F.scaled_dot_product_attention`` is routed to the memory-efficient attention
  op (``aten._scaled_dot_product_efficient_attention``): output + logsumexp,
  no s x s matrix, as on CUDA; on CPU the math fallback would otherwise
  materialize the attention matrix (it does for MLA, whose q and v head dims
  differ).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import ufx


@dataclass
class TracedStep:
    joint: torch.fx.GraphModule
    num_fwd_outputs: int
    params: list[tuple[str, int, torch.dtype, bool, bool]]  # name, numel, dtype, requires_grad, is_buffer
    seconds: float


def trace_function(fn: Callable[..., Any], args: list[Any], param_names: dict[int, str] | None = None,
                   decompositions: dict[Any, Callable[..., Any]] | None = None) -> tuple[torch.fx.GraphModule, int]:
    """Joint graph of ``fn(*args) -> loss``; ``param_names`` marks placeholders as parameters;
    ``decompositions``: a table applied while tracing (e.g. Inductor's). The backend's overrides
    are applied on top (``runtime.embedding_backward.with_decomposition``: a table that decomposes
    ``aten.embedding_dense_backward`` gets ``unsloth_fx.embedding_dense_backward`` instead), so the
    planner traces the graph the backend compiles."""
    from unsloth_fx.runtime.embedding_backward import with_decomposition

    joint, nfwd = _compat.aot_trace_joint(fn, args, with_decomposition(decompositions) if decompositions else None)
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    for i, name in (param_names or {}).items():
        ufx(placeholders[i]).param = name
    return joint, nfwd


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, **_kw):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # what SDPA does with a boolean mask before calling a fused kernel
            bias = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal and attn_mask is None, scale=scale)
    return out[0]


@contextlib.contextmanager
def cuda_like_tracing() -> Iterator[None]:
    """Patch transformers' tracing checks and SDPA for the duration of a trace."""
    import torch.nn.functional as F

    patches: list[tuple[Any, str, Any]] = [(F, "scaled_dot_product_attention", _efficient_sdpa)]
    try:
        import transformers.integrations.sdpa_attention as sa
        import transformers.masking_utils as mu

        patches.append((mu, "is_tracing", lambda *a, **k: True))
        if hasattr(sa, "torch") and hasattr(sa.torch.nn.functional, "scaled_dot_product_attention"):
            pass  # sdpa_attention calls torch.nn.functional.scaled_dot_product_attention: patched via F
    except ImportError:  # pragma: no cover
        pass
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, prev in old:
            setattr(obj, name, prev)


def fake_model(model: torch.nn.Module, fake_mode: Any, dtype: torch.dtype | None) -> None:
    """Replace every parameter and buffer (meta or real) by a fake CPU tensor, in place."""
    with fake_mode:
        for mod in model.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    dt = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                    mod._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=p.requires_grad)
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = torch.empty(b.shape, dtype=b.dtype)


def trace_model(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype | None = torch.bfloat16,
                progress: Callable[[str], None] | None = None,
                decompositions: dict[Any, Callable[..., Any]] | None = None) -> TracedStep:
    """Joint graph of one training step of a causal LM on fake tensors (``decompositions``:
    a table applied while tracing, e.g. :func:`unsloth_fx._compat.inductor_decompositions`)."""
    from torch.func import functional_call

    t0 = time.perf_counter()
    mode = _compat.fake_tensor_mode_cls()()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    fake_model(model, mode, dtype)
    pnames = [n for n, _ in model.named_parameters()]
    bnames = [n for n, _ in model.named_buffers()]
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    with mode:
        ids = torch.zeros(batch, seq, dtype=torch.long)
    names = pnames + bnames

    def step(*args: Any) -> torch.Tensor:
        state = dict(zip(names, args[:-1]))
        return functional_call(model, state, (), {"input_ids": args[-1], "labels": args[-1]}).loss

    if progress:
        progress(f"tracing {len(pnames)} parameter tensors at batch={batch} seq={seq} on fake tensors")
    with cuda_like_tracing(), mode:
        joint, nfwd = trace_function(step, [*tensors, ids], decompositions=decompositions)
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    rows = []
    for i, (name, t) in enumerate(zip(names, tensors)):
        is_buf = i >= len(pnames)
        ufx(placeholders[i]).param = name
        if is_buf:
            ufx(placeholders[i]).notes["buffer"] = True
        rows.append((name, t.numel(), t.dtype, bool(t.requires_grad) and not is_buf, is_buf))
    return TracedStep(joint, nfwd, rows, time.perf_counter() - t0)
