"""Pass ``share_weights``: report (and check) similar-weight sharing.

``share_weights="report"``: runs :func:`unsloth_fx.sharing.find_shared_tensors` on
the real parameter tensors behind the graph's inputs (``ParamInfo.tensor``; a
shapes-only report when they are on meta or fake), prints the table, and leaves
``share_weights.json`` / ``share_weights.md`` in the dump. The graph is not
changed (``modified=False``).

``share_weights="apply"``: parameters are module state, which a graph pass
cannot free (the backend only sees their placeholders). So the pass checks that
:func:`unsloth_fx.sharing.apply_sharing` already rewrote the module and reports
it; otherwise it raises an error naming the fix. It never claims memory it did
not free.
"""

from __future__ import annotations

import sys

import torch
import torch.fx

from unsloth_fx import _compat

from unsloth_fx.pass_base import PassContext, PassResult, graph_pass
from unsloth_fx.sharing.apply import SHARED_ATTR

APPLY_FIX = (
    "share_weights='apply' cannot free parameters from inside torch.compile (the backend sees only the "
    "traced graph; parameters are module state). Apply sharing to the module first, then compile:\n"
    "    from unsloth_fx.sharing import find_shared, apply_sharing\n"
    "    report = find_shared(model, tolerance=...); apply_sharing(model, report)\n"
    "    model = torch.compile(model, backend='unsloth', options={'share_weights': 'apply', ...})\n"
    "and create the optimizer after apply_sharing. Or use share_weights='report' to only detect."
)


def _named_tensors(ctx: PassContext) -> tuple[dict[str, torch.Tensor], bool]:
    named: dict[str, torch.Tensor] = {}
    real = True
    for info in sorted(ctx.params.values(), key=lambda p: p.index):
        if info.is_buffer:
            continue
        t = info.tensor
        if t is None or t.device.type == "meta":
            real = False
            t = torch.empty(info.shape, dtype=info.dtype, device="meta", requires_grad=info.requires_grad)
        named[info.name] = t
    if not real:  # one report mode for the whole graph: shapes only
        named = {n: (t if t.device.type == "meta" else torch.empty(t.shape, dtype=t.dtype, device="meta"))
                 for n, t in named.items()}
    return named, real


def _already_shared(ctx: PassContext) -> list[str]:
    return [info.name for info in ctx.params.values()
            if "._ufx_" in info.name or getattr(info.tensor, SHARED_ATTR, False)]


@graph_pass(name="share_weights", stage="joint")
def share_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Detect similar weights (report) or confirm that apply_sharing ran (apply); never edits the graph."""
    mode = ctx.options.share_weights
    if mode == "off":
        return PassResult(gm, False, {"mode": "off"})
    shared = _already_shared(ctx)
    if mode == "apply":
        if not shared:
            raise RuntimeError(APPLY_FIX)
        stats = {"mode": "apply", "status": "applied before compile by apply_sharing", "shared_inputs": len(shared)}
        ctx.shared["share_weights"] = stats
        return PassResult(gm, False, stats)
    from unsloth_fx.sharing.detect import find_shared_tensors

    key = f"share_weights.report(tolerance={ctx.options.share_tolerance})"
    report = ctx.shared.get(key)
    if report is None:  # idempotent: a second run reuses the first report
        with _compat.unset_fake_mode(), torch.no_grad():
            named, _ = _named_tensors(ctx)
            named = {n: t for n, t in named.items() if "._ufx_" not in n}
            report = find_shared_tensors(named, tolerance=ctx.options.share_tolerance, already_shared=shared)
        ctx.shared[key] = report
        md = report.to_markdown(max_rows=2000)  # the JSON lists every candidate
        ctx.artifacts["share_weights.json"] = report.to_json()
        ctx.artifacts["share_weights.md"] = md
        print(report.to_markdown(max_rows=40), file=sys.stdout)
    return PassResult(gm, False, {"mode": "report", "report_mode": report.mode, **report.summary()})
