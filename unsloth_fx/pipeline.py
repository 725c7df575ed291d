"""Pipelines: which passes run, in what order, with which options.

A pipeline is written as a string that round-trips::

    "default"                         the seed passes
    "default,+my_pass"                the seed passes, then my_pass
    "default,-share_weights"          the seed passes without share_weights
    "share_weights,chunk_recompute{chunks=8}"

``str(Pipeline.parse(s)) == s`` for canonical strings (no spaces).
Passes run grouped by stage (pre_grad, joint, forward/backward/inference), in
pipeline order within a stage. Between passes the runner verifies the graph
(when ``verify`` is on), times the pass, and hands the result to the dumper.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from unsloth_fx.pass_base import PassContext, PassSpec, get_pass

# chunk_recompute before plan_memory: its running sums of per-chunk weight gradients change the backward's
# memory (autograd's add chain keeps every chunk's partial alive), so the plan must see them, as the CLI
# planner's trace does. In the opposite order the 7B's 24 GiB compile was refused on an H100 at 26.03 GiB
# (minimum activations 4.24 GiB) where the graph that runs needs 23.87 GiB (docs/memory.md, twelfth session).
DEFAULT_PASSES = ("share_weights", "chunk_recompute", "plan_memory", "offload_activations", "reload_activations",
                  "fuse_optimizer", "inplace_saved_grad_scale")
DEFAULT_PASSES += ("rewrite_optimizer_step",)  # pre_grad; acts only on a compiled Adam/AdamW step with fuse_optimizer=True

_ITEM_RE = re.compile(r"^([+-]?)([A-Za-z_][A-Za-z0-9_]*)(?:\{(.*)\})?$")


@dataclass(frozen=True)
class PipelineItem:
    op: str  # "", "+" or "-"
    name: str
    options: tuple[tuple[str, str], ...] = ()  # raw option text, in written order

    def __str__(self) -> str:
        opts = "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}" if self.options else ""
        return f"{self.op}{self.name}{opts}"


def _split_top(s: str) -> list[str]:
    """Split on commas outside braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced '}}' in pipeline {s!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '{{' in pipeline {s!r}")
    parts.append("".join(cur))
    return parts


def _convert(spec: PassSpec, key: str, raw: str) -> Any:
    if key not in spec.options:
        raise ValueError(f"pass {spec.name!r} has no option {key!r}; its options are {sorted(spec.options) or 'none'}")
    default = spec.options[key]
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "on", "yes"):
                return True
            if raw.lower() in ("0", "false", "off", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"pass {spec.name!r} option {key}={raw!r}: expected {type(default).__name__}"
        ) from None
    return raw


@dataclass
class Pipeline:
    items: list[PipelineItem] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty pipeline string; use 'default' for the seed passes")
        items = []
        for part in _split_top(text.strip()):
            part = part.strip()
            m = _ITEM_RE.match(part)
            if not m:
                raise ValueError(f"cannot parse pipeline item {part!r} (expected name, +name, -name or name{{k=v}})")
            op, name, body = m.group(1), m.group(2), m.group(3)
            opts: list[tuple[str, str]] = []
            if body:
                for kv in body.split(","):
                    if "=" not in kv:
                        raise ValueError(f"pipeline item {part!r}: option {kv!r} is not key=value")
                    k, v = kv.split("=", 1)
                    opts.append((k.strip(), v.strip()))
            if name == "default":
                if op or opts:
                    raise ValueError("'default' takes no +/- and no options")
            else:
                spec = get_pass(name)  # unknown names fail here with the list of known passes
                for k, v in opts:
                    _convert(spec, k, v)
                if op == "-" and opts:
                    raise ValueError(f"'-{name}' removes a pass; it takes no options")
            items.append(PipelineItem(op, name, tuple(opts)))
        return cls(items)

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def passes(self) -> list[tuple[PassSpec, dict[str, Any]]]:
        """The expanded, ordered list of (pass, options)."""
        out: list[tuple[str, dict[str, str]]] = []
        for it in self.items:
            if it.name == "default":
                out.extend((n, {}) for n in DEFAULT_PASSES if all(n != m for m, _ in out))
            elif it.op == "-":
                out = [(n, o) for n, o in out if n != it.name]
            elif any(n == it.name for n, _ in out):  # naming a pass again sets its options in place
                out = [(n, dict(it.options) if n == it.name else o) for n, o in out]
            else:
                out.append((it.name, dict(it.options)))
        specs = []
        for name, raw in out:
            spec = get_pass(name)
            specs.append((spec, {k: _convert(spec, k, v) for k, v in raw.items()}))
        return specs

    def for_stage(self, stage: str) -> list[tuple[PassSpec, dict[str, Any]]]:
        return [(s, o) for s, o in self.passes() if s.stage == stage]


class PassFailure(RuntimeError):
    """A pass raised, or left a graph that fails verification."""


def announce(ctx: PassContext, what: str, seconds: float) -> None:
    """One line on stderr for compile work that took at least ``options.progress`` seconds (a
    first step of a large model compiles for minutes; this says where they go)."""
    limit = getattr(ctx.options, "progress", -1.0)
    if 0 <= limit <= seconds:
        print(f"unsloth-fx: graph {ctx.graph_id} {what}: {seconds:.1f} s", file=sys.stderr, flush=True)


def run_stage(
    pipeline: Pipeline,
    stage: str,
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    dumper: Any = None,
) -> torch.fx.GraphModule:
    """Run the pipeline's passes for ``stage`` on ``gm``; verify, time and dump each."""
    from unsloth_fx.verify import GraphInvariantError, verify_graph

    ctx.stage = stage
    ctx.stats.setdefault(stage, {})  # a stage that ran is listed even when it has no passes
    done: list[str] = []
    if dumper is not None:
        dumper.graph(stage, "input", gm, {}, 0.0)
    for spec, opts in pipeline.for_stage(stage):
        t0 = time.perf_counter()
        try:
            res = spec.run(gm, ctx, **opts)
        except Exception as e:
            before = ", ".join(done) or "none"
            raise PassFailure(f"pass {spec.name!r} ({stage} stage) failed: {e} [passes before it: {before}]") from e
        ms = (time.perf_counter() - t0) * 1e3
        announce(ctx, f"{stage} pass {spec.name}", ms / 1e3)
        gm = res.graph_module
        stats = {"modified": res.modified, "ms": round(ms, 3), **res.stats}
        ctx.stats.setdefault(stage, {})[spec.name] = stats
        if ctx.options.verify_enabled:
            try:
                verify_graph(gm, stage)
            except GraphInvariantError as e:
                before = ", ".join(done) or "none"
                raise PassFailure(
                    f"pass {spec.name!r} broke the {stage} graph: {e} [passes before it: {before}]"
                ) from e
        if dumper is not None:
            dumper.graph(stage, spec.name, gm, stats, ms)
        done.append(spec.name)
    return gm
