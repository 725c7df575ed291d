"""The memory schedule as files: JSON (versioned schema), self-contained HTML (inline SVG,
no network) and a PNG (matplotlib Agg).

JSON schema ``unsloth_fx.memory_schedule/1``::

    {"schema": "unsloth_fx.memory_schedule/1", "budget": int|null, "feasible": bool,
     "predicted_peak": int, "peak": {"step", "node", "phase", "by_category"},
     "static": {...bytes...}, "decisions": {node: decision}, "summary": {...},
     "events": [{"step", "phase", "node", "kind", "bytes", "live_bytes", "category",
                 "decision", "source"}, ...]}
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import asdict
from typing import Any

from unsloth_fx.memory.model import Timeline
from unsloth_fx.options import format_bytes

SCHEMA = "unsloth_fx.memory_schedule/1"
CATEGORIES = ("parameters", "optimizer", "inputs", "gradients", "saved", "outputs", "recomputed", "transient",
              "workspace")
COLORS = {"parameters": "#4c72b0", "optimizer": "#8172b2", "inputs": "#937860", "gradients": "#c44e52",
          "saved": "#dd8452", "outputs": "#da8bc3", "recomputed": "#55a868", "transient": "#8c8c8c",
          "workspace": "#ccb974"}


def to_json(tl: Timeline, *, budget: int | None = None, feasible: bool = True, decisions: dict[str, str] | None = None,
            summary: dict[str, Any] | None = None, max_events: int = 200_000) -> str:
    ev = [{k: v for k, v in asdict(e).items() if k != "expr" or v is not None} for e in tl.events[:max_events]]
    doc = {
        "schema": SCHEMA, "budget": budget, "feasible": feasible, "predicted_peak": tl.peak,
        "peak": {"step": tl.peak_step, "node": tl.peak_node, "phase": tl.peak_phase, "by_category": tl.peak_by_category},
        "static": {k: v for k, v in asdict(tl.static).items() if k != "resident_requests"}, "saved_bytes": tl.saved_bytes, "decisions": decisions or {},
        "summary": summary or {}, "warnings": tl.warnings, "truncated": len(tl.events) > max_events, "events": ev,
    }
    return json.dumps(doc, indent=1, default=str) + "\n"


def _series(tl: Timeline, points: int = 400) -> tuple[list[int], list[dict[str, int]], list[str]]:
    """Per-step live bytes by category (sampled to at most ``points`` steps, keeping each window's max)."""
    live = {"parameters": tl.static.parameters + tl.static.buffers, "optimizer": tl.static.optimizer_state,
            "inputs": tl.static.inputs}
    per_step: dict[int, tuple[dict[str, int], str]] = {}
    for e in tl.events:
        live[e.category] = live.get(e.category, 0) + (e.bytes if e.kind == "alloc" else -e.bytes)
        total = sum(live.values())
        cur = per_step.get(e.step)
        if cur is None or total >= sum(cur[0].values()):
            label = f"step {e.step} {e.phase}: {e.node} ({e.kind} {format_bytes(e.bytes)}, {e.category})" + (
                f" at {e.source}" if e.source else "") + (f" [{e.decision}]" if e.decision else "")
            per_step[e.step] = (dict(live), label)
    steps = sorted(per_step)
    if len(steps) > points:
        stride = -(-len(steps) // points)
        picked = []
        for i in range(0, len(steps), stride):
            win = steps[i:i + stride]
            picked.append(max(win, key=lambda s: sum(per_step[s][0].values())))
        steps = picked
    return steps, [per_step[s][0] for s in steps], [per_step[s][1] for s in steps]


def to_html(tl: Timeline, *, title: str = "memory schedule", budget: int | None = None,
            summary_lines: list[str] | None = None) -> str:
    """A self-contained page: stacked area timeline by category; hover a column for its tensor and source line."""
    steps, rows, labels = _series(tl)
    W, H, pad = 1000, 360, 50
    top = max([sum(r.values()) for r in rows] + [budget or 0, 1])
    n = max(len(steps), 1)
    colw = (W - 2 * pad) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 60}" font-family="sans-serif" font-size="11">']
    for i, (r, lab) in enumerate(zip(rows, labels)):
        y = H
        x = pad + i * colw
        tip = html.escape(lab + " | " + ", ".join(f"{c} {format_bytes(v)}" for c, v in r.items() if v))
        parts.append(f"<g><title>{tip}</title>")
        for c in CATEGORIES:
            v = r.get(c, 0)
            if v <= 0:
                continue
            h = (H - pad) * v / top
            y -= h
            parts.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(colw, 0.5):.2f}" height="{h:.2f}" fill="{COLORS[c]}"/>')
        parts.append("</g>")
    if budget:
        yb = H - (H - pad) * budget / top
        parts.append(f'<line x1="{pad}" x2="{W - pad}" y1="{yb:.1f}" y2="{yb:.1f}" stroke="red" stroke-dasharray="4"/>'
                     f'<text x="{W - pad}" y="{yb - 3:.1f}" text-anchor="end" fill="red">budget {format_bytes(budget)}</text>')
    parts.append(f'<text x="{pad}" y="{pad - 10}">peak {format_bytes(tl.peak)} at {html.escape(tl.peak_node)} '
                 f'({tl.peak_phase})</text>')
    for k, c in enumerate(CATEGORIES):
        parts.append(f'<rect x="{pad + k * 105}" y="{H + 20}" width="10" height="10" fill="{COLORS[c]}"/>'
                     f'<text x="{pad + k * 105 + 14}" y="{H + 29}">{c}</text>')
    parts.append("</svg>")
    lines = "".join(f"<li>{html.escape(s)}</li>" for s in (summary_lines or []))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h2>{html.escape(title)}</h2><ul>{lines}</ul>{''.join(parts)}</body></html>\n")


def to_png(tl: Timeline, *, title: str = "memory schedule", budget: int | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps, rows, _ = _series(tl)
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    ys = [[r.get(c, 0) / 2**30 for r in rows] for c in CATEGORIES]
    ax.stackplot(range(len(steps)), *ys, labels=CATEGORIES, colors=[COLORS[c] for c in CATEGORIES], step="post")
    if budget:
        ax.axhline(budget / 2**30, color="red", linestyle="--", label="budget")
    ax.set_xlabel("step (sampled)")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def artifacts(tl: Timeline, *, budget: int | None, feasible: bool, decisions: dict[str, str] | None,
              summary: dict[str, Any] | None, title: str, summary_lines: list[str] | None = None) -> dict[str, str | bytes]:
    """The three schedule files, by name."""
    return {
        "memory_schedule.json": to_json(tl, budget=budget, feasible=feasible, decisions=decisions, summary=summary),
        "memory_schedule.html": to_html(tl, title=title, budget=budget, summary_lines=summary_lines),
        "memory_schedule.png": to_png(tl, title=title, budget=budget),
    }
