"""Run benchmark cells in parallel while timing them one at a time.

Compiling a 1.5B-parameter training step takes about 80 s of CPU time and
little GPU time, so cells compile in parallel (``--jobs N``); the timed part
of each cell (its warm-up steps and measured steps) takes an exclusive file
lock, so no two cells time at once. What can still overlap a timed section is
another cell's first step (its compile plus one step's GPU work, about 0.1 s
for r1-distill-qwen-1.5b at seq 2048). Peak memory is per process
(``max_memory_allocated``) and is not affected by other processes.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
ENV = "UFX_BENCH_LOCK"


# the lock itself lives in the package (the suite's workers use it too)
from unsloth_fx.bench import timed_section  # noqa: E402,F401


def parallel_map(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """``[fn(x) for x in items]`` with up to ``jobs`` at once (fn starts a subprocess), order kept."""
    items = list(items)
    if jobs <= 1:
        return [fn(x) for x in items]
    os.environ.setdefault(ENV, os.path.join(tempfile.gettempdir(), f"ufx_bench_{os.getpid()}.lock"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))
