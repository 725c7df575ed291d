"""The pass API: ``@graph_pass``, ``PassContext``, ``PassResult`` and the
per-node annotation record ``node.meta["ufx"]``.

A pass is a plain function ``(gm, ctx, **options) -> PassResult`` plus
metadata. It must be deterministic (walk nodes in graph order) and idempotent:
running it a second time on its own output reports ``modified=False``.

Stages say which graph a pass sees:

- ``pre_grad``: the Dynamo graph (torch-level ops, before autograd tracing);
  passes that swap a region for a runtime op with its own backward live here.
- ``joint``: AOTAutograd's joint forward+backward graph, before partitioning
  (placeholders ``primals_*`` then ``tangents_*``).
- ``forward`` / ``backward``: the two graphs after partitioning.
- ``inference``: graphs traced without gradients.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

STAGES = ("pre_grad", "joint", "forward", "backward", "inference")

# Values an activation's plan can take (memory scheduler, issue 3).
DECISIONS = ("save", "recompute", "offload", "chunk")


@dataclass
class UfxMeta:
    """Everything unsloth-fx records on a node, in one place: ``node.meta["ufx"]``.

    Fields are optional; a pass fills what it decides and leaves the rest.
    """

    param: str | None = None  # fully qualified parameter name, for placeholders that are parameters
    decision: str | None = None  # one of DECISIONS, set by plan_memory
    region: str | None = None  # chunk region id, set by chunk_recompute
    chunk: int | None = None  # chunk index inside ``region``
    source: str | None = None  # "file:line" of the user code that made the node
    notes: dict[str, Any] = field(default_factory=dict)  # free-form, JSON-serializable

    def check(self) -> None:
        """Raise ``ValueError`` if the record is malformed."""
        if self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision={self.decision!r} is not one of {DECISIONS}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 0):
            raise ValueError(f"chunk={self.chunk!r} must be a non-negative int")
        if self.chunk is not None and self.region is None:
            raise ValueError("chunk is set but region is not")
        if not isinstance(self.notes, dict):
            raise ValueError("notes must be a dict")


def ufx(node: torch.fx.Node) -> UfxMeta:
    """The node's ``UfxMeta``, created on first access."""
    rec = node.meta.get("ufx")
    if rec is None:
        rec = node.meta["ufx"] = UfxMeta()
    return rec


@dataclass
class ParamInfo:
    """A graph input that is a model parameter (or buffer)."""

    name: str  # fully qualified name in the module, e.g. "model.layers.0.mlp.up_proj.weight"
    index: int  # position among the graph's placeholders
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    is_buffer: bool = False
    tensor: torch.Tensor | None = None  # the real tensor when available (never on meta / fake tracing)


@dataclass
class PassContext:
    """What a pass may read about the graph it is given.

    ``params`` maps placeholder index -> ParamInfo for the inputs that are
    model parameters. ``example_inputs`` are fake tensors (or real ones when
    the caller had nothing better). ``stats`` collects each pass's stats by
    pass name; ``artifacts`` is where passes leave files for the dump
    (name -> str | bytes).
    """

    options: Any  # unsloth_fx.options.Options
    stage: str = "joint"
    params: dict[int, ParamInfo] = field(default_factory=dict)
    example_inputs: list[Any] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    graph_id: int = 0
    num_fwd_outputs: int | None = None  # joint stage: how many joint outputs belong to forward
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, str | bytes] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # results one pass leaves for a later one

    def param_by_name(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.params.values()}


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether anything
    changed, and stats that end up in the dump header and ``pass_stats.json``."""

    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    name: str
    stage: str
    fn: Callable[..., PassResult]
    options: dict[str, Any]  # option name -> default value (its type parses pipeline strings)
    doc: str

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, **opts: Any) -> PassResult:
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise ValueError(
                f"pass {self.name!r} has no option(s) {unknown}; its options are {sorted(self.options)}"
            )
        res = self.fn(gm, ctx, **{**self.options, **opts})
        if not isinstance(res, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(res).__name__}, expected PassResult")
        return res


REGISTRY: dict[str, PassSpec] = {}


def graph_pass(
    *, name: str | None = None, stage: str = "joint", options: dict[str, Any] | None = None
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Register ``fn(gm, ctx, **options) -> PassResult`` as a pipeline pass.

    ``options`` gives each pass option's default; pipeline strings such as
    ``"chunk_recompute{chunks=8}"`` are parsed with the default's type.
    Registering a name twice replaces the earlier pass only when it comes from
    the same module and function name (re-import), otherwise it is an error.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")

    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        pname = name or fn.__name__
        old = REGISTRY.get(pname)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a pass named {pname!r} is already registered by {old.fn.__module__}")
        params = inspect.signature(fn).parameters
        if len(params) < 2:
            raise TypeError(f"pass {pname!r} must take (gm, ctx, **options)")
        REGISTRY[pname] = PassSpec(pname, stage, fn, dict(options or {}), (fn.__doc__ or "").strip())
        fn.ufx_pass = REGISTRY[pname]  # type: ignore[attr-defined]
        return fn

    return deco


def get_pass(name: str) -> PassSpec:
    _load_builtin_passes()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}") from None


def _load_builtin_passes() -> None:
    import unsloth_fx.passes  # noqa: F401  (registers the seed passes)


def as_dict(obj: Any) -> Any:
    """JSON-friendly view of dataclasses (UfxMeta, ParamInfo without tensors)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "tensor"}
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    return obj
