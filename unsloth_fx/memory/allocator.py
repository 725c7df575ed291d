"""How many bytes the CUDA caching allocator gives the step's long-lived tensors.

``torch.cuda.max_memory_allocated`` counts *blocks*, and a block can be larger than the tensor
in it. The memory model counts each tensor rounded to 512 B (``model.round_block``); this module
adds what that misses for the tensors alive through the whole step (parameters, buffers,
optimizer state), by replaying their allocations through the allocator's sizing rules
(c10/cuda/CUDACachingAllocator.cpp, default settings):

- a request is rounded up to 512 B; one of at most 1 MiB comes from the small pool, carved from
  2 MiB segments; a larger one from the large pool, carved from a 20 MiB segment when under
  10 MiB, else from a segment of its own size rounded up to 2 MiB;
- the smallest free block that fits is used (best fit), and it is split only when what remains
  is at least 512 B (small pool) or more than 1 MiB (large pool); otherwise the request gets
  the whole block.

So a 1.5B model's int4 query-projection codes (1,179,648 B) land in the 1,835,008 B remainders
the MLP weights (27,525,120 B, in 29,360,128 B segments) leave behind, and each holds 640 KiB
more than it asked for. On an H100 (docs/memory.md, fourteenth session) this slack was the whole
of the planner's error on both models measured: r1-distill-qwen-1.5b at 7 GiB measured 87.8 MiB
above its plan, and this model gives 87.2 MiB; r1-distill-qwen-7b at 24 GiB measured 45.8 MiB
above, and this model gives 49.3 MiB.

What it assumes: the tensors are allocated in the order given, one after another, from an
allocator with no cached blocks, none freed in between (a model built on the device, then its
optimizer state). Not modelled: ``expandable_segments``, ``roundup_power2_divisions`` and
``max_split_size_mb`` in ``PYTORCH_CUDA_ALLOC_CONF`` (:func:`default_settings` says whether they
are set), and state allocated while the allocator already caches freed activations.
"""

from __future__ import annotations

import bisect
import os
from typing import Iterable

MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to this
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to this come from the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: below this a large request gets a 20 MiB segment
LARGE_SEGMENT = 20 << 20  # kLargeBuffer
ROUND_LARGE = 2 << 20  # kRoundLarge: larger segments are rounded up to this


def _round(nbytes: int, unit: int) -> int:
    return -(-nbytes // unit) * unit


def blocks(requests: Iterable[int]) -> list[int]:
    """The block size each request in ``requests`` (bytes, in allocation order) is given."""
    free: dict[bool, list[int]] = {True: [], False: []}  # small pool?, sorted free block sizes
    out = []
    for n in requests:
        size = max(MIN_BLOCK, _round(int(n), MIN_BLOCK))
        small = size <= SMALL_SIZE
        pool = free[small]
        i = bisect.bisect_left(pool, size)
        if i < len(pool):
            block = pool.pop(i)
        elif small:
            block = SMALL_SEGMENT
        else:
            block = LARGE_SEGMENT if size < MIN_LARGE_ALLOC else _round(size, ROUND_LARGE)
        rest = block - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            bisect.insort(pool, rest)
            block = size
        out.append(block)
    return out


def block_slack(requests: Iterable[int]) -> int:
    """Bytes the blocks of ``requests`` hold beyond each request rounded to 512 B (what
    ``model.round_block`` already counts)."""
    reqs = [int(n) for n in requests if int(n) > 0]
    return sum(blocks(reqs)) - sum(max(MIN_BLOCK, _round(n, MIN_BLOCK)) for n in reqs)


def default_settings() -> bool:
    """Whether ``PYTORCH_CUDA_ALLOC_CONF`` leaves the sizing rules this module models as they are."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    settings = dict((k.strip(), v.strip().lower()) for k, _, v in (kv.partition(":") for kv in conf.split(",")) if v)
    expandable = settings.get("expandable_segments", "false") not in ("false", "0")
    return not (expandable or settings.keys() & {"roundup_power2_divisions", "max_split_size_mb"})
