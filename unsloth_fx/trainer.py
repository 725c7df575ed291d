"""``Trainer``: the seed's small training loop (progress, loss log, checkpoints, accumulation).

    trainer = unsloth_fx.Trainer(model, loader, optimizer="hybrid_adam", lr=1e-5, max_epochs=1,
                                 grad_accum=4, checkpoint_dir="ckpt", compile_options={"memory_budget": "7GiB"})
    history = trainer.train()

Batches may be

* dicts from :class:`unsloth_fx.data.DataEfficientLoader` (packed, with ``position_ids``;
  passed through ``DataEfficientLoader.model_inputs``, which adds ``use_cache=False``),
* other dicts (``input_ids``, ``labels``, optional ``attention_mask`` / ``position_ids``),
* ``(input_ids, labels)`` tuples, or a bare ``input_ids`` tensor (labels = input_ids).

Gradient accumulation weights each micro-batch's mean loss by its share of the
window's predicted tokens (labels != -100 after the causal shift), so ``grad_accum=2``
over two micro-batches gives the gradient of one batch holding both, even when they
hold different numbers of tokens.

A checkpoint (``checkpoint_dir/last.pt``) holds the model's and optimizer's state
dicts, the optimizer step, the position in the data (epoch, batches consumed) and
every RNG state (torch, CUDA, Python, NumPy); ``resume=True`` continues from it and
the next step's loss equals the uninterrupted run's (the data loader must replay the
same order: a list, a seeded DataLoader or DataEfficientLoader do).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Any, Iterable

import torch

__all__ = ["Trainer"]

IGNORE_INDEX = -100


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (state dicts without the ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(_unwrap(model).parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])


def model_inputs(batch: Any, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM from any supported batch form (on ``device``)."""
    if isinstance(batch, dict):
        if "cu_seqlens" in batch:  # DataEfficientLoader: packed rows need use_cache=False
            from unsloth_fx.data import DataEfficientLoader

            kw = DataEfficientLoader.model_inputs(batch)
        else:
            kw = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
            kw.setdefault("labels", kw["input_ids"])
            kw["use_cache"] = False
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a tuple batch must be (input_ids, labels), got {len(batch)} items")
        kw = {"input_ids": batch[0], "labels": batch[1], "use_cache": False}
    elif isinstance(batch, torch.Tensor):
        kw = {"input_ids": batch, "labels": batch, "use_cache": False}
    else:
        raise TypeError(f"unsupported batch type {type(batch).__name__}: give dicts, (input_ids, labels) tuples "
                        "or input_ids tensors")
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def predicted_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM loss averages over: labels[..., 1:] != -100 (transformers shifts inside the loss)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class Trainer:
    """A small training loop. Arguments:

    * ``model``: a module (compiled or not); ``compile_options`` (a dict of backend options, e.g.
      ``{"memory_budget": "7GiB"}``) compiles it with ``backend="unsloth"`` unless it is compiled already.
    * ``train_loader``: re-iterable batches (see the module docstring); ``set_epoch(e)`` is called if present.
    * ``optimizer``: ``"hybrid_adam"`` | ``"adamw"`` | a ``torch.optim.Optimizer``; ``lr`` its learning rate.
    * ``max_epochs``, ``max_steps`` (optimizer steps; wins when both are given), ``grad_accum`` (micro-batches
      per step), ``log_every`` (steps), ``max_grad_norm`` (None: no clipping). With the optimizer fused into
      backward (``unsloth_fx.fusion``) the loop re-binds it with ``grad_accum`` and clips by the previous
      step's global norm (``clip="prev_global_norm"``), since no step ever holds all gradients.
    * ``checkpoint_dir``, ``checkpoint_every`` (steps; default: at the end only), ``resume``.
    * ``autocast_dtype``: e.g. ``torch.bfloat16`` for fp32 weights + bf16 autocast ("AMP"); None: off.
    * ``progress``: a tqdm bar when tqdm is installed, else a printed line every ``log_every`` steps.
    """

    def __init__(self, model: torch.nn.Module, train_loader: Iterable[Any], optimizer: Any = "hybrid_adam",
                 lr: float = 1e-5, max_epochs: int = 1, max_steps: int | None = None, grad_accum: int = 1,
                 log_every: int = 10, checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, resume: bool = False,
                 compile_options: dict[str, Any] | None = None, autocast_dtype: torch.dtype | None = None,
                 max_grad_norm: float | None = None, progress: bool = True, optimizer_options: dict | None = None):
        if grad_accum < 1 or max_epochs < 1 or log_every < 1:
            raise ValueError(f"grad_accum, max_epochs and log_every must be >= 1, got {grad_accum}, {max_epochs}, "
                             f"{log_every}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        from unsloth_fx.api import build_optimizer

        self.raw_model = _unwrap(model)
        self.grad_accum_arg, self.max_grad_norm_arg = grad_accum, max_grad_norm
        self.optimizer = build_optimizer(self.raw_model, optimizer, lr, **(optimizer_options or {}))
        self.lr = lr
        self.fused = self._bind_fused_optimizer(compile_options)
        if compile_options is not None and model is self.raw_model:
            model = torch.compile(model, backend="unsloth", options=dict(compile_options))
        self.model = model
        self.train_loader = train_loader
        self.max_epochs, self.max_steps, self.grad_accum = max_epochs, max_steps, grad_accum
        self.log_every, self.max_grad_norm, self.progress = log_every, max_grad_norm, progress
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.autocast_dtype = autocast_dtype
        self.device = _device_of(self.raw_model)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of self.epoch consumed
        self.history: list[dict[str, float]] = []  # one record per optimizer step
        if resume:
            path = self.checkpoint_path()
            if os.path.exists(path):
                self.load_checkpoint(path)

    def _bind_fused_optimizer(self, compile_options: dict[str, Any] | None) -> bool:
        """Re-bind an in-backward optimizer (unsloth_fx.fusion) with this loop's accumulation and clipping."""
        try:
            from unsloth_fx import fusion
        except ImportError:
            return False
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        asked = bool(compile_options and str(compile_options.get("fuse_optimizer", "")).lower() in ("true", "1", "on"))
        bound = any(fusion.binding_for(p, scan=False) is not None for p in params)
        if not (asked or bound):
            return False
        clip = {"clip": "prev_global_norm", "max_norm": self.max_grad_norm_arg} if self.max_grad_norm_arg else {}
        fusion.attach(self.raw_model, self.optimizer, accumulation_steps=self.grad_accum_arg, **clip)
        return True

    # -- checkpoints -----------------------------------------------------------
    def checkpoint_path(self) -> str:
        assert self.checkpoint_dir is not None
        return os.path.join(self.checkpoint_dir, "last.pt")

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write model + optimizer state, step, data position and RNG states; returns the path."""
        path = path or self.checkpoint_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "history": self.history,
                 "rng": _rng_state(), "format": 1}
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash while saving never leaves a half-written last.pt
        return path

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.history = list(state["history"])
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        _set_rng_state(rng)

    # -- the loop --------------------------------------------------------------
    def _total_steps(self) -> int | None:
        if self.max_steps is not None:
            return self.max_steps
        try:
            return self.max_epochs * (len(self.train_loader) // self.grad_accum)  # type: ignore[arg-type]
        except TypeError:
            return None

    def _windows(self):
        """Yield lists of ``grad_accum`` micro-batches, advancing the data position."""
        while self.epoch < self.max_epochs:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            it = iter(self.train_loader)
            for _ in range(self.batches_in_epoch):  # resume: skip what was consumed
                next(it, None)
            window: list[Any] = []
            for batch in it:
                window.append(batch)
                if len(window) == self.grad_accum:
                    self.batches_in_epoch += len(window)
                    yield window
                    window = []
            # a partial last window is dropped: its step would weigh fewer tokens
            self.epoch += 1
            self.batches_in_epoch = 0

    def train_step(self, window: list[Any]) -> dict[str, float]:
        """One optimizer step over ``window`` (micro-batches); returns {"loss", "tokens", "seconds"}."""
        t0 = time.perf_counter()
        inputs = [model_inputs(b, self.device) for b in window]
        counts = [predicted_tokens(kw["labels"]) for kw in inputs]
        total = sum(counts)
        self.model.train()
        loss_sum = 0.0
        for kw, n in zip(inputs, counts):
            if n == 0:
                continue  # no predicted token: HF returns NaN; it carries no gradient either
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                loss = self.model(**kw).loss
            (loss * (n / total)).backward()
            loss_sum += float(loss.detach()) * n
        if self.max_grad_norm is not None and not self.fused:  # fused: clipped in backward (previous step's norm)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rec = {"step": self.step, "loss": loss_sum / total if total else math.nan, "tokens": total,
               "seconds": time.perf_counter() - t0}
        self.history.append(rec)
        return rec

    def train(self) -> list[dict[str, float]]:
        """Run until ``max_steps`` or ``max_epochs``; returns the per-step history."""
        total = self._total_steps()
        if self.max_steps is not None and self.step >= self.max_steps:
            return self.history
        bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                bar = None
        try:
            for window in self._windows():
                rec = self.train_step(window)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.step % self.log_every == 0 or self.step == total:
                    recent = self.history[-self.log_every:]
                    tps = sum(r["tokens"] for r in recent) / max(sum(r["seconds"] for r in recent), 1e-9)
                    msg = f"step {self.step}{'/' + str(total) if total else ''}  loss {rec['loss']:.4f}  {tps:,.0f} tok/s"
                    if bar is not None:
                        bar.write(msg)
                    elif self.progress:
                        print(msg, file=sys.stderr, flush=True)
                if self.checkpoint_dir and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.max_steps is not None and self.step >= self.max_steps:
                    break
        finally:
            if bar is not None:
                bar.close()
        if self.checkpoint_dir:
            self.save_checkpoint()
        return self.history
