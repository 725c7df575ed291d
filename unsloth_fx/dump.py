"""Dumps: what every pass did to every compiled graph, written for people.

Layout, per compiled graph (``<dump>/graph_<id>/``)::

    pipeline.txt              the pipeline string and the expanded pass list
    000_joint_input.py        the graph each pass received / built, as readable
    001_joint_share_weights.py  Python with shape and dtype on every line, headed
    001_joint_share_weights.diff  by "# built by <pass> (<stats>, <ms>)", plus a
    ...                       unified diff against the previous graph
    forward.py, backward.py   the graphs after partition (inference.py without grad)
    pass_stats.json           every pass's stats, by stage
    <artifacts>               files passes left in ctx.artifacts (memory_schedule.*)

Everything is also emitted to torch's structured trace, so ``TORCH_TRACE=dir``
plus tlparse shows the same artifacts.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any

import torch.fx

from unsloth_fx import _compat
from unsloth_fx.pass_base import as_dict


def graph_code(gm: torch.fx.GraphModule) -> str:
    """Readable Python for ``gm``: shapes, dtypes and devices on each line."""
    try:
        code = gm.print_readable(print_output=False, include_stride=False, include_device=True, colored=False)
    except TypeError:  # older signature
        code = gm.print_readable(print_output=False)
    # Drop the per-run memory addresses some torch versions print, so diffs stay clean.
    return re.sub(r" at 0x[0-9a-f]+", "", code)


def _fmt_stats(stats: dict[str, Any]) -> str:
    keep = [f"{k}={v}" for k, v in stats.items() if k not in ("ms",) and not isinstance(v, (dict, list))]
    return ", ".join(keep)


def _next_graph_dir(root: str) -> str:
    os.makedirs(root, exist_ok=True)
    taken = {int(m.group(1)) for name in os.listdir(root) if (m := re.fullmatch(r"graph_(\d+)", name))}
    n = 0
    while n in taken:
        n += 1
    return os.path.join(root, f"graph_{n:03d}")


class Dumper:
    """Writes one graph's dump folder; ``root=None`` only emits structured-trace artifacts."""

    def __init__(self, root: str | None, graph_id: int, pipeline_text: str, pass_names: list[str]):
        self.dir = _next_graph_dir(root) if root else None  # numbered per dump folder, from graph_000
        self.graph_id = graph_id
        self.counter = 0
        self.prev: dict[str, str] = {}
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
        self.write("pipeline.txt", pipeline_text + "\n\n" + "\n".join(pass_names) + "\n")

    def write(self, name: str, payload: str | bytes) -> None:
        if self.dir:
            mode = "wb" if isinstance(payload, bytes) else "w"
            with open(os.path.join(self.dir, name), mode) as f:
                f.write(payload)
        if isinstance(payload, str):
            _compat.trace_artifact(f"g{self.graph_id}_{name}", payload)

    def graph(self, stage: str, pass_name: str, gm: torch.fx.GraphModule, stats: dict[str, Any], ms: float) -> None:
        code = graph_code(gm)
        header = f"# built by {pass_name} ({_fmt_stats(stats) or 'no stats'}, {ms:.1f} ms)\n"
        base = f"{self.counter:03d}_{stage}_{pass_name}"
        self.write(base + ".py", header + code)
        prev = self.prev.get(stage)
        if prev is not None:
            diff = "".join(
                difflib.unified_diff(prev.splitlines(True), code.splitlines(True), "before", f"after {pass_name}")
            )
            self.write(base + ".diff", diff or "# no change\n")
        self.prev[stage] = code
        self.counter += 1

    def final(self, name: str, gm: torch.fx.GraphModule) -> None:
        self.write(f"{name}.py", graph_code(gm))

    def finish(self, ctx: Any) -> None:
        self.write("pass_stats.json", json.dumps(as_dict(ctx.stats), indent=2, default=str) + "\n")
        for name, payload in ctx.artifacts.items():
            self.write(name, payload)
