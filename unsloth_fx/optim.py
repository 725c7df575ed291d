"""HybridAdamW: AdamW with compact, per-block gated moment state.

``HybridAdamW(params, lr, betas, eps, weight_decay, state_precision=...)``
keeps the AdamW moments of each parameter in one of five tiers (see
``unsloth_fx.runtime.adamw`` for the layout and bytes per parameter):

* ``"fp32"`` / ``"bf16"``: full moments (bf16 rounded stochastically),
* ``"int8"`` / ``"int4"``: blockwise quantized moments (128 elements a block),
* ``"hybrid"``: int4 (or int8, ``hybrid_bits=8``) moments, except the blocks
  whose *update direction* the quantization hurts most, which keep fp32
  moments.  The kernel measures that error every step for every block; every
  ``gate_every`` steps the gate promotes blocks with error above
  ``gate_promote`` and demotes fp32 blocks whose error fell below
  ``gate_demote`` (hysteresis), never more than ``hybrid_cap`` of a tensor's
  blocks in fp32.  Decisions (``slot``) and errors live in the state dict.

Which tier each parameter gets is :func:`tier_for` (the planner uses the same
function): in the quantized tiers (int8 / int4 / hybrid), norms, biases, 1-D
tensors and tensors under ``min_quant_numel`` elements keep fp32 moments (they
are tiny); embeddings and the LM head get ``high_precision_tier`` (default
"fp32"; "bf16" / "int8" / "int4" / "hybrid" trade their precision for memory:
for a 1.5B model with a 151,936-token vocabulary they are 0.47B parameters,
3.5 GiB of fp32 moments); ``quantize_all=True`` puts everything in the group's
tier. Names are known when the optimizer is given ``model.named_parameters()``;
use :func:`param_groups` otherwise.

bf16 weights are updated with stochastic rounding (``stochastic_rounding``),
from Philox keyed by a per-parameter seed and the step, so a run is
reproducible for a fixed ``seed``.

Non-finite gradients: with ``check_finite=True`` (default) a parameter whose
gradient holds a NaN or inf is not updated at all (weight, moments and step
unchanged) and ``state["nonfinite_skips"]`` counts it, without a host sync.
The kernel also never writes a block whose gradient is non-finite, so the
moments are never corrupted even with ``check_finite=False`` (then only the
affected 128-element blocks are skipped).

``implementation="reference"`` runs the pure-PyTorch reference (same math,
codes and random bits as the Triton kernels) instead of the ops.

State arena (``state_arena=True``, default): the first time any parameter needs
state, every trainable parameter gets its state at once, as 256-byte aligned
views into one buffer per device and dtype (see :class:`_StateArena`). Many small
per-tensor allocations would each be rounded up by the CUDA caching allocator
(a cached block is handed out whole when less than 1 MiB would remain; requests
up to 10 MiB carve 20 MiB segments): on an H100, r1-distill-qwen-1.5b's 1.8 GiB of
int4 state held about 85 MiB of such slack (the planner's error, matched block by
block in docs/memory.md, "Fourteenth session"). A handful of large allocations (one per state dtype: ``torch.save``
cannot write one storage viewed as several dtypes) lose only their rounding.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Iterable

import torch
from torch import Tensor

from unsloth_fx import _compat
from unsloth_fx.runtime import adamw as _k
from unsloth_fx.runtime import optim_reference as _ref
from unsloth_fx.runtime.adamw import TIERS, hybrid_regate_, init_state, state_nbytes

__all__ = ["HybridAdamW", "param_groups", "reference_step_state", "TIERS", "tier_for", "state_tensor_nbytes"]

HIGH_PRECISION_NAMES = ("embed", "lm_head", "wte", "wpe", "norm", "bias")
EMBEDDING_NAMES = ("embed", "lm_head", "wte", "wpe")  # the role high_precision_tier applies to
GATE_DEFAULTS = {4: (0.02, 0.01), 8: (1e-3, 5e-4)}  # bits -> (promote, demote)
_META_KEYS = ("step", "nonfinite_skips", "tier", "seed", "gate_clock", "hybrid_bits")


def _is_high_precision_name(name: str | None, patterns=HIGH_PRECISION_NAMES) -> bool:
    return name is not None and any(p in name.lower() for p in patterns)


def tier_for(name: str | None, shape: Iterable[int], state_precision: str, *, quantize_all: bool = False,
             min_quant_numel: int = 4096, high_precision_tier: str = "fp32") -> str:
    """The moment tier HybridAdamW gives a parameter (one of ``TIERS``).

    ``name``: the parameter's qualified name (None when unknown: then only the
    shape rules apply); ``shape``: its *global* shape (FSDP2 shards get the same
    tier on every rank); the rest as the optimizer's group options.

    * ``state_precision`` "fp32" / "bf16", or ``quantize_all``: ``state_precision``;
    * 1-D tensors, tensors under ``min_quant_numel`` elements, norms and biases: "fp32";
    * embeddings and the LM head (names containing embed / lm_head / wte / wpe):
      ``high_precision_tier``;
    * everything else: ``state_precision``.
    """
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    if state_precision in ("fp32", "bf16") or quantize_all:
        return state_precision
    if len(shape) < 2 or numel < min_quant_numel:
        return "fp32"
    if _is_high_precision_name(name, EMBEDDING_NAMES):
        return high_precision_tier
    if _is_high_precision_name(name):
        return "fp32"
    return state_precision


_SIZES_CACHE: dict[tuple, tuple[int, ...]] = {}


def state_tensor_nbytes(tier: str, numel: int, *, hybrid_bits: int = 4, hybrid_cap: float = 0.1) -> tuple[int, ...]:
    """Bytes of each moment-state tensor ``init_state`` allocates for one parameter of
    ``numel`` elements in ``tier`` (each a separate allocation), without allocating:
    the state is built on the meta device and measured with ``state_nbytes``. The
    hybrid tier's fp32 pool is allocated at ``hybrid_cap`` of the blocks up front,
    so its bytes do not depend on how many blocks the gate promotes. The two 0-d
    fp32 counters HybridAdamW adds per parameter (step, nonfinite_skips) are not
    included (see :meth:`HybridAdamW.state_layout`). With ``state_arena`` the tensors
    are views into shared buffers (see :meth:`HybridAdamW.state_arena_bytes`), same sizes."""
    key = (tier, int(numel), int(hybrid_bits), float(hybrid_cap))
    out = _SIZES_CACHE.get(key)
    if out is None:
        st = init_state(tier, torch.empty(int(numel), device="meta"), hybrid_bits=hybrid_bits, hybrid_cap=hybrid_cap)
        out = tuple(state_nbytes({k: v}) for k, v in st.items())
        _SIZES_CACHE[key] = out
    return out


def param_groups(model: torch.nn.Module, state_precision: str = "hybrid", *, high_precision_tier: str = "fp32",
                 **group_options) -> list[dict]:
    """Groups for ``model`` when the optimizer will not see parameter names:
    embeddings / LM head (``high_precision_tier``, found by module type as well as
    by name), norms / biases / 1-D tensors (fp32 moments) and everything else
    (``state_precision``). Groups of the same tier are merged, fp32 first."""
    emb, high, low = [], [], []
    emb_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    if out_emb is not None:
        emb_ids |= {id(p) for p in out_emb.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            high.append(p)
        elif id(p) in emb_ids or _is_high_precision_name(name, EMBEDDING_NAMES):
            emb.append(p)
        elif _is_high_precision_name(name):
            high.append(p)
        else:
            low.append(p)
    # as before the override existed: with fp32 / bf16 state the embeddings join the fp32 group
    emb_tier = high_precision_tier if state_precision not in ("fp32", "bf16") else "fp32"
    by_tier: dict[str, list] = {}
    for tier, ps in (("fp32", high), (emb_tier, emb), (state_precision, low)):
        if ps:
            by_tier.setdefault(tier, []).extend(ps)
    return [{"params": ps, "state_precision": tier, **group_options} for tier, ps in by_tier.items()]


def reference_step_state(tier: str, param: Tensor, grad: Tensor, state: dict, *, lr, betas, eps,
                         weight_decay, step, found_inf=None, seed=0, stochastic_rounding=True,
                         hybrid_bits: int = 4) -> None:
    """Pure-PyTorch twin of ``unsloth_fx.runtime.adamw.adamw_step_state``."""
    kw = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay, step=step,
              found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)
    if tier in ("fp32", "bf16"):
        _ref.reference_step_(param, grad, tier=tier, exp_avg=state["exp_avg"],
                             exp_avg_sq=state["exp_avg_sq"], **kw)
    elif tier in ("int8", "int4"):
        _ref.reference_step_(param, grad, tier="quant", bits=8 if tier == "int8" else 4,
                             **{k: state[k] for k in ("m_codes", "m_scale", "v_codes", "v_scale")}, **kw)
    elif tier == "hybrid":
        _ref.reference_step_(param, grad, tier="hybrid", bits=hybrid_bits,
                             **{k: state[k] for k in ("m_codes", "m_scale", "v_codes", "v_scale",
                                                      "slot", "pool_m", "pool_v", "err")}, **kw)
    else:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def _local(t: Tensor) -> Tensor:
    """The calling rank's shard of a DTensor (a view: in-place updates reach the
    parameter), or ``t`` itself.  FSDP2 parameters and their gradients are DTensors."""
    return t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t


def _all_ranks_flag(flag: Tensor, p: Tensor) -> Tensor:
    """Max of a 0-d flag over the ranks holding shards of DTensor ``p``: a shard
    whose gradient is non-finite must make *every* shard skip, or the ranks'
    copies of the step counter (and the weight) drift apart."""
    if not hasattr(p, "device_mesh"):
        return flag
    import torch.distributed as dist

    mesh = p.device_mesh
    groups = mesh.get_all_groups() if mesh.ndim > 1 else [mesh.get_group()]
    for grp in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=grp)
    return flag


ARENA_ALIGN = 256  # bytes: each state tensor of an arena starts at a multiple of this


class _StateArena:
    """One buffer per (device, dtype), handed out as aligned views.

    Per dtype rather than one uint8 buffer per device: ``torch.save`` refuses tensors
    that view one storage as different dtypes ("Cannot save multiple tensors or
    storages that view the same data as different types"), and checkpoints save
    ``optimizer.state_dict()``, whose tensors are the state itself. A few large
    allocations (fp32, uint8, ... : at most five) still lose only their own rounding.

    Two passes over the same sequence of requests: the first returns meta tensors and
    only counts bytes; ``allocate()`` then makes the buffers, and the second pass
    returns the views, in the same order and at the same offsets."""

    def __init__(self) -> None:
        self.end: dict[tuple[torch.device, torch.dtype], int] = {}  # bytes laid out so far
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] | None = None

    def empty_on(self, device: torch.device):
        """An ``init_state``-style ``(shape, dtype) -> Tensor`` allocating on ``device``."""
        def empty(shape, dtype: torch.dtype) -> Tensor:
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            numel = math.prod(shape)
            key = (device, dtype)
            start = -(-self.end.get(key, 0) // ARENA_ALIGN) * ARENA_ALIGN
            self.end[key] = start + numel * dtype.itemsize
            if self.buffers is None:
                return torch.empty(shape, dtype=dtype, device="meta")
            i = start // dtype.itemsize
            return self.buffers[key][i:i + numel].view(shape)
        return empty

    def allocate(self) -> list[Tensor]:
        """Make the buffers (contents undefined); returns them."""
        self.buffers = {(d, dt): torch.empty(n // dt.itemsize, dtype=dt, device=d) for (d, dt), n in self.end.items()}
        self.end = {}
        return list(self.buffers.values())


def arena_sizes(states: Iterable[tuple[str, int, int, float]]) -> list[int]:
    """Bytes of each buffer a state arena allocates for parameters with these ``(tier, numel,
    hybrid_bits, hybrid_cap)``, in allocation order: the same layout ``HybridAdamW`` makes
    (``init_state``'s tensors, then the two counters, per parameter), on meta. The memory
    planner's allocator model counts these as the state's allocations."""
    arena = _StateArena()
    empty = arena.empty_on(torch.device("meta"))
    for tier, numel, bits, cap in states:
        init_state(tier, torch.empty(int(numel), device="meta"), hybrid_bits=bits, hybrid_cap=cap, empty=empty)
        empty((), torch.float32), empty((), torch.float32)  # step, nonfinite_skips
    return [(n // dt.itemsize) * dt.itemsize for (_, dt), n in arena.end.items()]


def _as_tensor(x, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(x), dtype=torch.float32, device=device)


class HybridAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with compact moments.

    Args beyond ``torch.optim.AdamW``'s (all may be set per param group):
      state_precision: "hybrid" | "fp32" | "bf16" | "int8" | "int4".
      stochastic_rounding: round bf16 weights (and bf16 moments) stochastically.
      hybrid_bits: 4 or 8, the quantized store of the hybrid tier.
      hybrid_cap: at most this fraction of a tensor's blocks keeps fp32 moments
        (the fp32 pool is allocated at this size: 8 * cap bytes/param).
      gate_every: re-run the gate every K optimizer steps (and before step 1,
        from a scratch run of step 1).
      gate_promote / gate_demote: hysteresis thresholds on the relative squared
        error of a block's update direction (promote above, demote below);
        default ``GATE_DEFAULTS[hybrid_bits]``.
      min_quant_numel: tensors with fewer elements keep fp32 moments.
      quantize_all: quantize embeddings/LM head/norms/biases/small tensors too.
      check_finite: skip (and count) parameters whose gradient is non-finite.
      seed: base seed of the stochastic-rounding random numbers.
      implementation: "auto" (Triton ops; reference on plain CPU) | "reference".
      state_arena: (optimizer-wide) allocate the state of all trainable parameters
        at once, the first time one needs it, as views into one buffer per device and
        dtype (no allocator slack per tensor; :meth:`state_arena_bytes`); False: one
        allocation per state tensor, on each parameter's first step.

    Hyper-parameters are held as 0-d fp32 tensors on the parameters' device,
    so LR schedulers update them in place (``fill_``) and nothing recompiles.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 state_precision: str = "hybrid", stochastic_rounding: bool = True, *,
                 hybrid_bits: int = 4, hybrid_cap: float = 0.1, gate_every: int = 100,
                 gate_promote: float | None = None, gate_demote: float | None = None,
                 min_quant_numel: int = 4096, quantize_all: bool = False, high_precision_tier: str = "fp32",
                 check_finite: bool = True, seed: int = 0, implementation: str = "auto",
                 state_arena: bool = True):
        if state_precision not in TIERS:
            raise ValueError(f"state_precision={state_precision!r}; expected one of {TIERS}")
        if high_precision_tier not in TIERS:
            raise ValueError(f"high_precision_tier={high_precision_tier!r} (the tier of embeddings / LM head); "
                             f"expected one of {TIERS}")
        if hybrid_bits not in (4, 8):
            raise ValueError(f"hybrid_bits must be 4 or 8, got {hybrid_bits}")
        if not 0.0 <= float(hybrid_cap) <= 1.0:
            raise ValueError(f"hybrid_cap must be in [0, 1], got {hybrid_cap}")
        # defaults by store: int4 re-quantization typically costs ~0.015 relative
        # squared update error per block, int8 ~5e-5 (measured on random data)
        dp, dd = GATE_DEFAULTS[hybrid_bits]
        gate_promote = dp if gate_promote is None else gate_promote
        gate_demote = dd if gate_demote is None else gate_demote
        if not gate_demote <= gate_promote:
            raise ValueError(f"gate_demote ({gate_demote}) must be <= gate_promote ({gate_promote})")
        if implementation not in ("auto", "reference"):
            raise ValueError(f"implementation must be 'auto' or 'reference', got {implementation!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                        hybrid_bits=hybrid_bits, hybrid_cap=hybrid_cap, gate_every=gate_every,
                        gate_promote=gate_promote, gate_demote=gate_demote,
                        min_quant_numel=min_quant_numel, quantize_all=quantize_all,
                        high_precision_tier=high_precision_tier, check_finite=check_finite)
        self._seed = int(seed)
        self._implementation = implementation
        self.state_arena = bool(state_arena)
        self._arenas: list[weakref.ref] = []  # the arena buffers; alive while state views of them are
        super().__init__(params, defaults)

    # -- groups ---------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["state_precision"] not in TIERS:
            raise ValueError(f"state_precision={g['state_precision']!r}; expected one of {TIERS}")
        if g.get("high_precision_tier", "fp32") not in TIERS:
            raise ValueError(f"high_precision_tier={g['high_precision_tier']!r}; expected one of {TIERS}")
        self._tensorize(g)

    @staticmethod
    def _group_device(g):
        devs = {p.device for p in g["params"]}
        return devs.pop() if len(devs) == 1 else torch.device("cpu")

    def _tensorize(self, g: dict) -> None:
        dev = self._group_device(g)
        for k in ("lr", "eps", "weight_decay"):
            g[k] = _as_tensor(g[k], dev)
        g["betas"] = tuple(_as_tensor(b, dev) for b in g["betas"])

    # -- per-parameter set-up -------------------------------------------------
    def _tier_for(self, g: dict, p: Tensor, name: str | None) -> str:
        return tier_for(name, p.shape, g["state_precision"], quantize_all=g["quantize_all"],
                        min_quant_numel=g["min_quant_numel"],
                        # a state dict saved before the option existed has no key: today's default
                        high_precision_tier=g.get("high_precision_tier", "fp32"))

    def _init_state(self, g: dict, p: Tensor, name: str | None, index: int, empty=None) -> dict:
        """Fresh state of ``p``; ``empty`` as in ``init_state`` (default: its own allocations)."""
        tier = self._tier_for(g, p, name)  # from the global shape: same tier on every rank
        # DTensor (FSDP2): state is per local shard, so quantization blocks never straddle shards
        st = init_state(tier, _local(p), hybrid_bits=g["hybrid_bits"], hybrid_cap=g["hybrid_cap"], empty=empty)
        if empty is None:
            empty = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=p.device)  # noqa: E731
        st["step"] = empty((), torch.float32).zero_()
        st["nonfinite_skips"] = empty((), torch.float32).zero_()
        st["tier"] = tier
        # one Philox key per parameter; 31 bits (the kernel's seed argument is int32)
        st["seed"] = (self._seed * 1_000_003 + index * 7919 + 1) & 0x7FFFFFFF
        if tier == "hybrid":
            st["gate_clock"] = 0
            st["hybrid_bits"] = g["hybrid_bits"]
        return st

    def _state_of(self, g: dict, p: Tensor, i: int, index: int) -> dict:
        """``self.state[p]``, set up first if empty (``p`` is ``g["params"][i]``, ``index`` its seed key)."""
        st = self.state[p]
        if not st:
            if self.state_arena:
                self._init_arena(also=p)
            else:
                names = g.get("param_names")
                st.update(self._init_state(g, p, names[i] if names else None, index))
        return st

    def _init_arena(self, also: Tensor | None = None) -> None:
        """Set up the state of every trainable parameter without state (and of ``also``), in
        group order, as views into new buffers (one per device and dtype). The first call
        covers every parameter; a parameter that needs state later (a group added after the
        first step) gets a new, small arena with any others still without state, made the
        same way, rather than plain tensors: one code path, and still no per-tensor slack."""
        todo = []
        index = 0
        for g in self.param_groups:
            names = g.get("param_names")
            for i, p in enumerate(g["params"]):
                index += 1
                if (p.requires_grad or p is also) and not self.state.get(p):
                    todo.append((g, p, names[i] if names else None, index))
        arena = _StateArena()

        def build() -> list[dict]:
            return [self._init_state(g, p, name, index, empty=arena.empty_on(_local(p).device))
                    for g, p, name, index in todo]

        build()  # on meta: sizes only
        self._hold(arena.allocate())
        for (_, p, _, _), st in zip(todo, build()):
            self.state[p].update(st)

    # -- the step -------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        entries = []
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(
                        "HybridAdamW does not support sparse gradients (got one for a parameter of "
                        f"shape {tuple(p.shape)}); use torch.optim.SparseAdam for it, or "
                        "nn.Embedding(sparse=False)")
                entries.append((g, p, grad, self._state_of(g, p, i, index), None))
        # every parameter in one grouped update: the gradients exist anyway (norms are 0-d outputs)
        self._step_group(entries)
        return loss

    def _step_group(self, entries: list) -> None:
        """Update ``entries`` = [(group, param, grad, state, grad_norm or None)] in order, with the
        numerics of ``_step_param`` on each (bit for bit: same norms, counters, kernels, seeds),
        amortizing the host work: one multi-tensor norm for the gradients without one, the step /
        skip counters of all members in a few multi-tensor ops, hyper-parameters looked up once per
        param group, and one multi-tensor kernel launch per (tier, dtype) bucket where the Triton
        kernels run. DTensor parameters take the per-parameter path (their skip flag needs an
        all-reduce)."""
        plain = []
        for e in entries:
            if hasattr(e[1], "device_mesh"):
                self._step_param(e[0], e[1], e[2], e[3], e[4])
            else:
                plain.append(e)
        if not plain:
            return
        # non-finite check: the fp32 L2 norm of every gradient, one multi-tensor call for the missing ones
        need = [k for k, e in enumerate(plain) if e[4] is None and e[0]["check_finite"]]
        norms = [e[4] for e in plain]
        if need:
            for k, n in zip(need, _compat.foreach_norm_fp32([plain[k][2] for k in need])):
                norms[k] = n
        found: list = [None] * len(plain)
        by_dev: dict = {}
        for k, e in enumerate(plain):
            if e[0]["check_finite"]:
                by_dev.setdefault(e[3]["step"].device, []).append(k)
            else:
                e[3]["step"].add_(1.0)
        for ks in by_dev.values():
            fs = _k.step_bookkeeping_many_([norms[k] for k in ks], [plain[k][3]["step"] for k in ks],
                                           [plain[k][3]["nonfinite_skips"] for k in ks])
            for k, f in zip(ks, fs):
                found[k] = f
        # the kernels: members bucketed by what one launch can share; order within a bucket kept
        hyper: dict = {}
        buckets: dict = {}
        for k, (g, p, grad, st, _) in enumerate(plain):
            if p.numel() == 0:
                continue
            dev = p.device
            h = hyper.get((id(g), dev))
            if h is None:
                h = hyper[(id(g), dev)] = tuple(x if x.device == dev else x.to(dev) for x in
                                                (g["lr"], *g["betas"], g["eps"], g["weight_decay"]))
            tier = st["tier"]
            if tier == "hybrid" and (st["gate_clock"] == 0 or (st["gate_clock"] + 1) % g["gate_every"] == 0):
                # first step's scratch gate, or a re-gate after this step: the per-parameter path
                self._run_one(g, p, grad, st, h, found[k])
                continue
            key = (id(g), tier, st.get("hybrid_bits", 4), p.dtype, grad.dtype, dev, found[k] is None)
            buckets.setdefault(key, (g, h, []))[2].append((p, grad, st, found[k]))
        for (_, tier, bits, *_rest), (g, h, members) in buckets.items():
            if self._implementation == "reference" or len(members) == 1:
                for p, grad, st, f in members:
                    self._run_one(g, p, grad, st, h, f)
                continue
            _k.adamw_step_many(tier, [m[0] for m in members], [m[1] for m in members], [m[2] for m in members],
                               lr=h[0], betas=(h[1], h[2]), eps=h[3], weight_decay=h[4],
                               found_infs=None if members[0][3] is None else [m[3] for m in members],
                               stochastic_rounding=g["stochastic_rounding"], hybrid_bits=bits)
            if tier == "hybrid":
                for _, _, st, _ in members:
                    st["gate_clock"] += 1

    def _run_one(self, g: dict, p: Tensor, grad: Tensor, st: dict, h: tuple, found_inf) -> None:
        """The kernel part of ``_step_param`` for one (non-DTensor) parameter whose counters are done."""
        kw = dict(lr=h[0], betas=(h[1], h[2]), eps=h[3], weight_decay=h[4], step=st["step"],
                  found_inf=found_inf, seed=st["seed"], stochastic_rounding=g["stochastic_rounding"],
                  hybrid_bits=st.get("hybrid_bits", 4))
        self._run_kernel(g, p, grad, st, kw)

    def _step_param(self, g: dict, p: Tensor, grad: Tensor, st: dict, grad_norm: Tensor | None = None) -> None:
        sharded = p
        p, grad = _local(p), _local(grad)
        dev = p.device
        h = [x if x.device == dev else x.to(dev) for x in (g["lr"], *g["betas"], g["eps"], g["weight_decay"])]
        found_inf = None
        if g["check_finite"]:
            # One read of the gradient, no temporary: the fp32 L2 norm is non-finite iff the
            # gradient holds a NaN/inf (or its norm overflows fp32, > 1.8e19: treated as non-finite).
            # isfinite(grad).all() would allocate a bool tensor the size of the gradient.
            if grad_norm is None:
                grad_norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            if hasattr(sharded, "device_mesh"):  # DTensor: every shard must agree before counting
                found_inf = _all_ranks_flag(torch.logical_not(torch.isfinite(grad_norm)).to(torch.float32), sharded)
                st["nonfinite_skips"].add_(found_inf)
                st["step"].add_(1.0 - found_inf)
            else:
                found_inf = _k.step_bookkeeping_(grad_norm, st["step"], st["nonfinite_skips"])
        else:
            st["step"].add_(1.0)
        kw = dict(lr=h[0], betas=(h[1], h[2]), eps=h[3], weight_decay=h[4], step=st["step"],
                  found_inf=found_inf, seed=st["seed"], stochastic_rounding=g["stochastic_rounding"],
                  hybrid_bits=st.get("hybrid_bits", 4))
        if p.numel() == 0:  # an FSDP2 rank may hold an empty shard (dim 0 < world size)
            return
        self._run_kernel(g, p, grad, st, kw)

    def _run_kernel(self, g: dict, p: Tensor, grad: Tensor, st: dict, kw: dict) -> None:
        tier = st["tier"]
        run = reference_step_state if self._implementation == "reference" else _k.adamw_step_state
        if tier == "hybrid" and st["gate_clock"] == 0:
            # First step: gate *before* anything is quantized.  The error the kernel
            # measures is that of re-quantizing the state it holds; once a block's
            # first state has been quantized the damage (e.g. a second moment raised
            # to the code's floor) is already in the state and invisible to it.  So
            # run step 1 once on scratch copies to measure, gate, then step for real.
            scratch = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
            run(tier, p.detach().clone(), grad, scratch, **{**kw, "step": st["step"].clone()})
            st["err"].copy_(scratch["err"])
            st["last_gate"] = hybrid_regate_(st, bits=st["hybrid_bits"],
                                             promote=g["gate_promote"], demote=g["gate_demote"])
        run(tier, p, grad, st, **kw)
        if tier == "hybrid":
            st["gate_clock"] += 1
            if st["gate_clock"] % g["gate_every"] == 0:
                st["last_gate"] = hybrid_regate_(st, bits=st["hybrid_bits"],
                                                 promote=g["gate_promote"], demote=g["gate_demote"])

    def _where(self, p: Tensor) -> tuple[dict, int, int]:
        """(group, position in it, 1-based index over all groups: the seed key ``step()`` uses)."""
        where = getattr(self, "_param_where", {}).get(id(p))
        if (where is None or not any(where[0] is g for g in self.param_groups)
                or where[0]["params"][where[1]] is not p):
            self._param_where = {id(q): (g, i, k) for k, (g, i, q) in enumerate(
                ((g, i, q) for g in self.param_groups for i, q in enumerate(g["params"])), start=1)}
            where = self._param_where.get(id(p))
            if where is None:
                raise KeyError(f"parameter of shape {tuple(p.shape)} is not in this optimizer")
        return where

    def _entry(self, p: Tensor, grad: Tensor, grad_norm: Tensor | None) -> tuple:
        if grad.is_sparse:
            raise RuntimeError(
                "HybridAdamW does not support sparse gradients (got one for a parameter of "
                f"shape {tuple(p.shape)}); use torch.optim.SparseAdam for it, or "
                "nn.Embedding(sparse=False)")
        g, i, index = self._where(p)
        return g, p, grad, self._state_of(g, p, i, index), grad_norm

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor, grad_norm: Tensor | None = None) -> None:
        """Update one parameter now with ``grad``, exactly as :meth:`step` would
        (same state set-up, seed, step count, gate); ``p.grad`` is not read.
        The fused backward (``unsloth_fx.fusion``) calls this for each parameter
        as soon as its gradient is final; ``step()`` then skips it (grad None).
        ``grad_norm``: the gradient's fp32 L2 norm when the caller has it (saves a read)."""
        g, p, grad, st, grad_norm = self._entry(p, grad, grad_norm)
        self._step_param(g, p, grad, st, grad_norm)

    @torch.no_grad()
    def step_params(self, params: list[Tensor], grads: list[Tensor],
                    grad_norms: list[Tensor | None] | None = None) -> None:
        """Update several parameters now, each exactly as :meth:`step_param` would (bit for
        bit), with the host work of the group amortized (see ``_step_group``). The grouped
        fused backward op calls this once per group of parameters; ``grad_norms``: each
        gradient's fp32 L2 norm (0-d) when the caller has it, else None."""
        norms = grad_norms if grad_norms is not None else [None] * len(params)
        self._step_group([self._entry(p, g, n) for p, g, n in zip(params, grads, norms)])

    # -- state dict: byte-exact (torch's default would cast state to the param dtype)
    def load_state_dict(self, state_dict: dict) -> None:
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        current = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, current))
        super().load_state_dict(state_dict)
        loaded = [(id_map[key], saved) for key, saved in state_dict["state"].items() if key in id_map]
        if not self.state_arena:
            for p, saved in loaded:
                self.state[p] = {k: (v.detach().clone().to(p.device) if isinstance(v, Tensor) else
                                     (dict(v) if isinstance(v, dict) else v))
                                 for k, v in saved.items()}
        else:
            # one fresh arena for all loaded state (same layout rule as the first step); parameters
            # the state dict has no state for get theirs from _init_arena when they first need it
            arena = _StateArena()
            for p, saved in loaded:
                empty = arena.empty_on(_local(p).device)
                for v in saved.values():
                    if isinstance(v, Tensor):
                        empty(v.shape, v.dtype)
            self._hold(arena.allocate())
            for p, saved in loaded:
                empty = arena.empty_on(_local(p).device)
                self.state[p] = {k: (empty(v.shape, v.dtype).copy_(v.detach()) if isinstance(v, Tensor) else
                                     (dict(v) if isinstance(v, dict) else v))
                                 for k, v in saved.items()}
        for g in self.param_groups:
            self._tensorize(g)

    # -- reporting ------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of moment state (codes, scales, pools, slots, errors) over all
        parameters that have state; excludes the per-tensor step counters."""
        return sum(state_nbytes({k: v for k, v in st.items() if k not in _META_KEYS})
                   for st in self.state.values())

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the state of every trainable parameter that has none now, as its first
        step would (values included), without stepping: e.g. to hold the state's memory
        before the first step's activations, or to measure it."""
        if self.state_arena:
            self._init_arena()
            return
        index = 0
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                index += 1
                if p.requires_grad:
                    self._state_of(g, p, i, index)

    def state_arena_sizes(self) -> list[int]:
        """Bytes of each arena buffer: those the state lives in now, else those the first step
        will allocate (one per device and dtype); [] with ``state_arena=False``."""
        if not self.state_arena:
            return []
        held = [b.nbytes for b in (r() for r in self._arenas) if b is not None]
        if held:
            return held
        return arena_sizes((self._tier_for(g, p, (g.get("param_names") or [None] * len(g["params"]))[i]),
                            _local(p).numel(), g["hybrid_bits"], g["hybrid_cap"])
                           for g in self.param_groups for i, p in enumerate(g["params"]) if p.requires_grad)

    def _hold(self, buffers: list[Tensor]) -> None:
        self._arenas = [r for r in self._arenas if r() is not None] + [weakref.ref(b) for b in buffers]

    def state_arena_bytes(self) -> int:
        """Bytes of the arena buffers the state lives in now (0 with ``state_arena=False``
        or before any state): what the device holds for the state, alignment gaps
        included; >= :meth:`state_bytes` plus 8 bytes of counters per parameter. A
        buffer counts while state tensors view it (weak references: replaced state,
        e.g. by ``load_state_dict``, stops counting when it is freed)."""
        return sum(b.nbytes for b in (r() for r in self._arenas) if b is not None)

    def state_bytes_per_param(self) -> float:
        """Moment-state bytes per parameter element, over parameters with state."""
        n = sum(_local(p).numel() for p in self.state.keys())
        return self.state_bytes() / n if n else 0.0

    def nonfinite_skips(self) -> int:
        """Total number of (parameter, step) updates skipped for a non-finite gradient."""
        return int(sum(float(st["nonfinite_skips"]) for st in self.state.values() if "nonfinite_skips" in st))

    def tier_summary(self) -> dict:
        """{tier: number of parameter elements}, plus "hybrid_fp32_blocks"."""
        out: dict = {}
        for p, st in self.state.items():
            out[st["tier"]] = out.get(st["tier"], 0) + _local(p).numel()
            if st["tier"] == "hybrid":
                out["hybrid_fp32_blocks"] = out.get("hybrid_fp32_blocks", 0) + int((st["slot"] >= 0).sum())
                out["hybrid_blocks"] = out.get("hybrid_blocks", 0) + st["slot"].numel()
        return out

    def state_layout(self) -> list[tuple[str | None, str, tuple[int, ...]]]:
        """(name, tier, bytes of each state tensor) for every trainable parameter this
        optimizer holds, in group order: the tensors it holds now where the parameter
        has state, else those its first step will allocate (same :func:`tier_for` and
        ``init_state``, measured on meta). Includes the two 0-d fp32 counters per
        parameter; sizes are of the calling rank's shard for DTensors. This is what
        the memory planner counts for an optimizer instance."""
        out = []
        for g in self.param_groups:
            names = g.get("param_names")
            for i, p in enumerate(g["params"]):
                if not p.requires_grad:
                    continue
                name = names[i] if names else None
                st = self.state.get(p)
                if st:
                    sizes = tuple(state_nbytes({k: v}) for k, v in st.items() if isinstance(v, Tensor))
                    out.append((name, st["tier"], sizes))
                    continue
                tier = self._tier_for(g, p, name)
                sizes = state_tensor_nbytes(tier, _local(p).numel(), hybrid_bits=g["hybrid_bits"],
                                            hybrid_cap=g["hybrid_cap"]) + (4, 4)  # step, nonfinite_skips
                out.append((name, tier, sizes))
        return out
