"""Data that needs no download, and padding-free packing of variable-length examples.

* :func:`stdlib_corpus`, :func:`byte_tokens`, :func:`train_val_split`, :func:`lm_batches`:
  a real-text language-modelling corpus (the Python standard library's own source),
  byte-level tokens (vocab 256), and deterministic fixed-length LM batches.
* :class:`DataEfficientLoader`: packs variable-length examples into batches under a
  token budget with no padding (the flash-attention "varlen" layout).

Label convention: transformers' ``*ForCausalLM`` shifts labels inside the loss (the
logit at position t is scored against ``labels[t + 1]``), so ``labels`` here are
aligned with ``input_ids``, not pre-shifted; ``-100`` marks positions not to predict.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import torch

__all__ = [
    "DataEfficientLoader",
    "byte_tokens",
    "lm_batches",
    "stdlib_corpus",
    "train_val_split",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- corpus


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The ``.py`` files directly in the standard library's directory (the ``os`` module's), in sorted order.

    Files are joined with a newline. Deterministic for a given Python installation (the
    bytes differ between Python versions). ``max_bytes`` truncates the result; None
    returns all of it (about 4-5 MB on CPython 3.11). Sub-packages are not included, and
    neither is site-packages, which lives below the same directory.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(glob.escape(root), "*.py")))
    if not files:
        raise RuntimeError(f"no .py files found in {root!r}; is the standard library installed as source?")
    parts: list[bytes] = []
    size = 0
    for path in files:
        with open(path, "rb") as f:
            parts.append(f.read() + b"\n")
        size += len(parts[-1])
        if max_bytes is not None and size >= max_bytes:
            break
    data = b"".join(parts)
    return data if max_bytes is None else data[:max_bytes]


def byte_tokens(text_or_bytes: str | bytes | bytearray) -> torch.Tensor:
    """Byte-level tokens (vocab 256) as a 1-D ``torch.long`` tensor; ``str`` is UTF-8 encoded."""
    if isinstance(text_or_bytes, str):
        text_or_bytes = text_or_bytes.encode("utf-8")
    if not isinstance(text_or_bytes, (bytes, bytearray)):
        raise TypeError(f"byte_tokens takes str or bytes, got {type(text_or_bytes).__name__}")
    if len(text_or_bytes) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(text_or_bytes), dtype=torch.uint8).long()


def train_val_split(
    tokens: torch.Tensor, val_fraction: float = 0.1, seed: int = 0, block_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into (train, val) by whole blocks of ``block_size`` tokens.

    ``round(val_fraction * n_blocks)`` blocks (at least one, and at least one left for
    training) are drawn for validation with ``seed``; each side keeps the blocks in
    their original order, so text inside a block stays contiguous. Every token lands in
    exactly one side.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks = list(torch.split(tokens, block_size))
    if len(blocks) < 2:
        raise ValueError(
            f"{tokens.numel()} tokens make {len(blocks)} block(s) of {block_size}; need at least 2 to split: "
            "pass a smaller block_size"
        )
    n_val = min(max(1, round(val_fraction * len(blocks))), len(blocks) - 1)
    g = torch.Generator().manual_seed(seed)
    val_ids = set(torch.randperm(len(blocks), generator=g)[:n_val].tolist())
    train = [b for i, b in enumerate(blocks) if i not in val_ids]
    val = [b for i, b in enumerate(blocks) if i in val_ids]
    return torch.cat(train), torch.cat(val)


def lm_batches(
    tokens: torch.Tensor, batch: int, seq: int, seed: int = 0, epochs: int | None = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, labels)`` of shape ``[batch, seq]`` from a 1-D token stream.

    The stream is cut into non-overlapping windows of ``seq`` tokens; each epoch visits
    them in an order drawn from ``seed + epoch`` and drops the last incomplete batch.
    ``labels`` equal ``input_ids`` (transformers shifts them inside the loss).
    ``epochs=None`` repeats forever.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    n_windows = tokens.numel() // seq
    if n_windows < batch:
        raise ValueError(
            f"{tokens.numel()} tokens give {n_windows} windows of seq={seq}, fewer than one batch of {batch}"
        )
    windows = tokens[: n_windows * seq].view(n_windows, seq)
    epoch = 0
    while epochs is None or epoch < epochs:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n_windows, generator=g)
        for start in range(0, n_windows - batch + 1, batch):
            x = windows[order[start : start + batch]].clone()
            yield x, x.clone()
        epoch += 1


# --------------------------------------------------------------------------- packing


def _as_token_list(example: Any, key: str, index: int) -> list[int]:
    if isinstance(example, dict):
        if key not in example:
            raise KeyError(f"example {index} has no {key!r} field (fields: {sorted(example)}); pass key=...")
        example = example[key]
    if isinstance(example, torch.Tensor):
        if example.dim() != 1:
            raise ValueError(f"example {index}: token tensor must be 1-D, got shape {tuple(example.shape)}")
        return example.tolist()
    if isinstance(example, (list, tuple)):
        return list(example)
    # numpy arrays and other sequences
    if hasattr(example, "tolist"):
        return list(example.tolist())
    raise TypeError(
        f"example {index} is a {type(example).__name__}; expected a list of token ids, a 1-D tensor, "
        f"or a dict with {key!r}"
    )


class DataEfficientLoader:
    """Pack variable-length examples into padding-free batches under a token budget.

    A batch holds at most ``batch_size`` examples and at most ``max_tokens`` tokens, laid
    end to end in one row (the flash-attention varlen / ``DataCollatorWithFlattening``
    layout), so there is no padding at all. Each batch is a dict:

    * ``input_ids``, ``labels``, ``position_ids``: ``long`` tensors of shape ``[1, T]``,
      ``T <= max_tokens``. ``position_ids`` restart at 0 for every example; transformers
      models given ``position_ids`` and no ``attention_mask`` detect the restarts and keep
      attention within each example (sdpa, eager and flash-attention alike) -- but only
      with ``use_cache=False``: with a KV cache (``config.use_cache`` defaults to True in
      transformers) the restarts are ignored and attention crosses examples.
      ``labels`` are ``input_ids`` with ``-100`` at each example's first position, so no
      example is trained to predict from the one before it.
    * ``cu_seqlens`` (``int32``, ``[n + 1]``) and ``max_seqlen`` (int): example boundaries
      for varlen kernels. Keep them out of ``model(**batch)``; :meth:`model_inputs` returns
      just the keys a transformers model takes.

    ``dataset``: a list of token lists, a torch ``Dataset`` (map-style) of lists, 1-D
    tensors or dicts, or a ``datasets.Dataset``; dict examples are read from ``key``.
    Examples are visited in a ``seed``-determined order (reshuffled by :meth:`set_epoch`,
    like ``DistributedSampler``) and packed greedily in that order. An example longer than
    ``max_tokens`` raises unless ``truncate=True`` (then it keeps its first ``max_tokens``
    tokens). ``drop_last`` drops a final batch that is full neither in examples nor in tokens.

    ``T`` varies between batches: compile with ``dynamic=True`` (or mark the sequence
    dimension dynamic) to avoid a recompile per length.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        truncate: bool = False,
        key: str = "input_ids",
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (examples per batch), got {batch_size!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int (tokens per batch), got {max_tokens!r}")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.truncate = truncate
        self.key = key
        self.epoch = 0
        self._examples = self._load(dataset)
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- reading the dataset -------------------------------------------------

    def _load(self, dataset: Any) -> list[list[int]]:
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"DataEfficientLoader needs a sized, indexable dataset (list, map-style torch Dataset, "
                f"datasets.Dataset); got {type(dataset).__name__}"
            )
        n = len(dataset)
        if n == 0:
            raise ValueError("DataEfficientLoader got an empty dataset: nothing to pack")
        column_names = getattr(dataset, "column_names", None)
        if isinstance(column_names, list):  # datasets.Dataset: read the column at once
            if self.key not in column_names:
                raise KeyError(f"dataset has no {self.key!r} column (columns: {column_names}); pass key=...")
            raw = dataset[self.key]
            rows = [_as_token_list(x, self.key, i) for i, x in enumerate(raw)]
        else:
            rows = [_as_token_list(dataset[i], self.key, i) for i in range(n)]
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"example {i} is empty (0 tokens); remove empty examples before packing")
            if len(row) > self.max_tokens:
                if not self.truncate:
                    raise ValueError(
                        f"example {i} has {len(row)} tokens, more than max_tokens={self.max_tokens}: "
                        f"raise max_tokens or pass truncate=True to keep its first {self.max_tokens} tokens"
                    )
                rows[i] = row[: self.max_tokens]
        return rows

    # -- planning ------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (order = f(seed + epoch))."""
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        n = len(self._examples)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def plan(self) -> list[list[int]]:
        """Example indices of each batch of the current epoch, in packing order."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        batches: list[list[int]] = []
        cur: list[int] = []
        cur_tokens = 0
        for i in self._order():
            n = len(self._examples[i])
            if cur and (len(cur) == self.batch_size or cur_tokens + n > self.max_tokens):
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += n
        if cur:
            full = len(cur) == self.batch_size or cur_tokens == self.max_tokens
            if full or not self.drop_last:
                batches.append(cur)
        self._plan_cache = (self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.plan())

    def _collate(self, indices: list[int]) -> dict[str, Any]:
        rows = [self._examples[i] for i in indices]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        input_ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)
        position_ids = torch.cat([torch.arange(len(r), dtype=torch.long) for r in rows])
        labels = input_ids.clone()
        labels[position_ids == 0] = IGNORE_INDEX
        cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(lengths.max()),
            "example_indices": list(indices),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for indices in self.plan():
            yield self._collate(indices)

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The keys of ``batch`` that a transformers causal LM's ``forward`` takes, plus ``use_cache=False``.

        ``use_cache=False`` matters: with a KV cache, transformers skips packed-sequence
        detection and attention silently crosses example boundaries.
        """
        out: dict[str, Any] = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        out["use_cache"] = False
        return out

    @property
    def num_tokens(self) -> int:
        """Tokens per epoch (after truncation): the sum of all batch lengths."""
        return sum(len(r) for r in self._examples)
