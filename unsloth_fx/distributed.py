"""unsloth-fx under FSDP2 (``torch.distributed.fsdp.fully_shard``).

unsloth-fx composes with PyTorch's own sharding; it does not replace it.  This
module holds what composing needs:

* :func:`shard_model` - ``fully_shard`` every decoder block, then the root, after
  checking that no shared weight is split across FSDP units
  (:func:`check_sharing_groups`, :func:`merge_sharing_groups`).
* :func:`sharded_static_bytes` / :func:`gpus_needed` / :func:`format_plan` -
  static bytes per GPU under FSDP2 for an optimizer tier, and the smallest world
  size that fits a per-GPU byte budget.
* :func:`shard_blocks_align` - when a sharded HybridAdamW update is bit-for-bit
  the unsharded one (quantization blocks are per local shard).
* :func:`optimizer_state_dict` / :func:`load_optimizer_state_dict` - HybridAdamW
  state through ``torch.distributed.checkpoint`` (per-rank keys: the compact
  state of a shard is not a slice of any global tensor).

See docs/distributed.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "GPU_80GB", "ParamCounts", "ShardedBytes", "check_sharing_groups", "decoder_blocks", "format_plan",
    "gpus_needed", "load_optimizer_state_dict", "merge_sharing_groups", "optimizer_bytes_per_param",
    "optimizer_state_dict", "optimizer_state_template", "param_counts", "shard_blocks_align", "shard_model", "sharded_static_bytes",
]

GPU_80GB = 80 * 10**9  # "80 GB" card, decimal bytes (an H100 80GB reports 79.6 GiB = 85.5e9 B)
QUANT_BLOCK = 128  # elements per quantization block of HybridAdamW's int8/int4/hybrid tiers
PLAN_TIERS = ("amp-fp32", "fp32", "bf16", "int8", "int4", "hybrid")


# -- FSDP units and weight sharing ------------------------------------------------------------

def decoder_blocks(model: nn.Module) -> list[str]:
    """Module names of the decoder blocks: the children of the largest ``nn.ModuleList``
    (``model.layers.0``, ...); the usual FSDP2 unit."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (best is None or len(m) > best[0]):
            best = (len(m), name, m)
    if best is None:
        return []
    return [f"{best[1]}.{i}" if best[1] else str(i) for i in range(best[0])]


def _owner(module_path: str, units: Sequence[str]) -> str | None:
    """The deepest unit whose module contains ``module_path`` ('' is the root)."""
    hits = [u for u in units if u == "" or module_path == u or module_path.startswith(u + ".")]
    return max(hits, key=lambda u: (u.count(".") + (u != ""), len(u))) if hits else None


def _common_parent(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    out = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


@dataclass(frozen=True)
class SplitPair:
    """One shared parameter registered under names owned by two different FSDP units."""
    name_a: str
    unit_a: str | None
    name_b: str
    unit_b: str | None
    numel: int

    def message(self) -> str:
        parent = _common_parent(self.name_a.rsplit(".", 1)[0], self.name_b.rsplit(".", 1)[0])
        ua = "<no unit>" if self.unit_a is None else repr(self.unit_a)
        ub = "<no unit>" if self.unit_b is None else repr(self.unit_b)
        return (f"shared parameter ({self.numel} elements) would be split across FSDP units: "
                f"{self.name_a!r} belongs to unit {ua} but {self.name_b!r} belongs to unit {ub}; "
                f"FSDP2 would shard and all-gather it twice and the two uses would drift apart. "
                f"Fix: make both names one unit (fully_shard their common parent {parent or '<root>'!r} "
                f"instead, see unsloth_fx.distributed.merge_sharing_groups), or drop this pair from "
                f"apply_sharing")


def _split_pairs(model: nn.Module, units: Sequence[str]) -> list[SplitPair]:
    by_id: dict[int, list[str]] = {}
    numel: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        numel[id(p)] = p.numel()
    out = []
    for pid, names in by_id.items():
        owners = [(n, _owner(n.rsplit(".", 1)[0] if "." in n else "", units)) for n in names]
        first = owners[0]
        for other in owners[1:]:
            if other[1] != first[1]:
                out.append(SplitPair(first[0], first[1], other[0], other[1], numel[pid]))
                break
    return out


def check_sharing_groups(model: nn.Module, fsdp_units: Sequence[str]) -> None:
    """Refuse (``ValueError``) FSDP units that split a shared parameter.

    ``fsdp_units``: module names that will be (or are) ``fully_shard``-ed, ``""``
    for the root.  A parameter is owned by the deepest unit containing the module
    that registers it.  A parameter registered under several names (tied
    embeddings, or a pair made one by ``unsloth_fx.sharing.apply_sharing``, whose
    derived module registers the kept ``Parameter`` again) must have one owner.
    """
    units = list(fsdp_units)
    missing = [u for u in units if u and u not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"FSDP units {missing} are not modules of {type(model).__name__}")
    bad = _split_pairs(model, units)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(bad[0].message() + more)


def merge_sharing_groups(model: nn.Module, fsdp_units: Sequence[str]) -> list[str]:
    """``fsdp_units`` minus the units that would split a shared parameter, so each
    shared parameter falls to the nearest unit enclosing all its names (the root,
    ``""``, is added if no unit does).  Deterministic: same input, same output."""
    units = list(dict.fromkeys(fsdp_units))
    if "" not in units:
        units.append("")
    while True:
        bad = _split_pairs(model, units)
        if not bad:
            return units
        drop = set()
        for sp in bad:
            parent = _common_parent(sp.name_a.rsplit(".", 1)[0], sp.name_b.rsplit(".", 1)[0])
            for u in (sp.unit_a, sp.unit_b):
                if u and u != parent and not parent.startswith(u + "."):
                    drop.add(u)  # a unit strictly inside the common parent: fold it into its parent
        units = [u for u in units if u not in drop]


def shard_model(model: nn.Module, units: Sequence[str] | None = None, *, mesh=None,
                **fully_shard_kwargs: Any) -> list[str]:
    """``fully_shard`` each unit (default: every decoder block, then the root ``""``),
    innermost first, after :func:`check_sharing_groups`.  Returns the unit names.
    ``fully_shard_kwargs`` go to ``torch.distributed.fsdp.fully_shard``
    (``mp_policy``, ``reshard_after_forward``, ...)."""
    from torch.distributed.fsdp import fully_shard

    units = list(decoder_blocks(model) + [""] if units is None else units)
    check_sharing_groups(model, units)
    modules = dict(model.named_modules())
    for u in sorted(units, key=lambda u: -(u.count(".") + (u != ""))):
        fully_shard(modules[u], mesh=mesh, **fully_shard_kwargs)
    return units


# -- HybridAdamW block / shard alignment ------------------------------------------------------

def shard_blocks_align(shape: Sequence[int], world_size: int, block: int = QUANT_BLOCK) -> bool:
    """True when every rank's FSDP2 shard (``Shard(0)``: ``ceil(shape[0] / world_size)``
    rows per rank, the last ranks fewer or none) starts at a flat offset that is a
    multiple of ``block``.  Then each local quantization block is exactly a block of
    the unsharded tensor, and a sharded int8/int4/hybrid update equals the unsharded
    one (same codes and scales).  Otherwise blocks are cut at different places: the
    update is still a correct blockwise AdamW, within the tier's tolerance of it."""
    if world_size <= 1 or not shape:
        return True
    rows = math.ceil(shape[0] / world_size)
    inner = math.prod(shape[1:])
    return (rows * inner) % block == 0


# -- memory accounting --------------------------------------------------------------------------

@lru_cache(maxsize=None)
def optimizer_bytes_per_param(tier: str, hybrid_bits: int = 4, hybrid_cap: float = 0.1) -> float:
    """Optimizer-state bytes per parameter element for a HybridAdamW tier, measured on
    the state HybridAdamW really allocates (``runtime.adamw.init_state`` on a 2^17-element
    tensor).  ``"amp-fp32"`` and ``"fp32"`` are AdamW's two fp32 moments (8 B)."""
    from unsloth_fx.runtime.adamw import init_state, state_nbytes

    if tier == "amp-fp32":
        tier = "fp32"
    n = QUANT_BLOCK * 1024
    st = init_state(tier, torch.empty(n, device="meta"), hybrid_bits=hybrid_bits, hybrid_cap=hybrid_cap)
    return state_nbytes(st) / n


@dataclass
class ParamCounts:
    """Parameter elements of a model, as the sharded accounting needs them.

    total: all parameters (shared ones once); fp32_state: those HybridAdamW keeps
    in fp32 moments in every tier (embeddings, LM head, norms, biases, 1-D, < 4096
    elements); units: elements owned by each non-root FSDP unit; root: elements
    owned by the root unit (everything not in a unit).
    """
    total: int
    fp32_state: int = 0
    units: dict[str, int] = field(default_factory=dict)
    root: int = 0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "ParamCounts":
        units = m.get("units", {})
        if not isinstance(units, Mapping):
            units = {f"unit{i}": int(n) for i, n in enumerate(units)}
        total = int(m["total"])
        root = int(m.get("root", total - sum(units.values())))
        return cls(total=total, fp32_state=int(m.get("fp32_state", 0)), units=dict(units), root=root)


def param_counts(model: nn.Module | str, units: Sequence[str] | None = None,
                 min_quant_numel: int = 4096) -> ParamCounts:
    """Count ``model`` (a module, meta is fine, or a zoo name) by FSDP unit
    (default: decoder blocks; the root owns the rest)."""
    from unsloth_fx.optim import _is_high_precision_name

    if isinstance(model, str):
        from unsloth_fx.zoo import build_model

        model = build_model(model, device="meta")
    units = [u for u in (decoder_blocks(model) if units is None else units) if u]
    out = ParamCounts(total=0, units={u: 0 for u in units})
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        out.total += n
        if id(p) in emb or _is_high_precision_name(name) or p.ndim < 2 or n < min_quant_numel:
            out.fp32_state += n
        owner = _owner(name.rsplit(".", 1)[0] if "." in name else "", units)
        if owner:
            out.units[owner] += n
        else:
            out.root += n
    return out


@dataclass
class ShardedBytes:
    """Static bytes per GPU under FSDP2 (activations excluded), all in bytes.

    params / grads / optimizer_state: the sharded copies (divided by world size);
    gather_buffers: unsharded copies that FSDP2 materializes and that do not shrink
    with the world size: the root unit's parameters and gradients (FSDP2 does not
    reshard the root after forward), plus ``units_in_flight`` all-gathered copies of
    the largest unit's parameters and one copy of its unsharded gradients (waiting
    for reduce-scatter).
    """
    world_size: int
    tier: str
    params: int
    grads: int
    optimizer_state: int
    gather_buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.gather_buffers

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _tier_dtypes(tier: str, param_bytes: int | None, grad_bytes: int | None) -> tuple[int, int, int, int]:
    """(sharded param bytes, sharded grad bytes, gathered param bytes, gathered grad bytes)."""
    if tier == "amp-fp32":
        # stock FSDP2 mixed precision: fp32 sharded params/grads, bf16 all-gather, fp32 reduce
        return (param_bytes or 4, grad_bytes or 4, 2, 4)
    pb, gb = param_bytes or 2, grad_bytes or param_bytes or 2  # bf16 weights, stochastic rounding
    return pb, gb, pb, gb


def sharded_static_bytes(model_or_counts: nn.Module | str | ParamCounts | Mapping[str, Any], world_size: int,
                         optimizer_tier: str, *, param_bytes: int | None = None, grad_bytes: int | None = None,
                         units_in_flight: int = 2, hybrid_bits: int = 4, hybrid_cap: float = 0.1) -> ShardedBytes:
    """Per-GPU static bytes of FSDP2 training with ``world_size`` ranks.

    ``optimizer_tier``: ``"amp-fp32"`` (stock: fp32 params, grads and AdamW
    moments, bf16 compute), or a HybridAdamW tier (``"fp32"``, ``"bf16"``,
    ``"int8"``, ``"int4"``, ``"hybrid"``) with bf16 weights and grads.  Parameters
    that HybridAdamW keeps in fp32 moments (``ParamCounts.fp32_state``) cost 8 B
    of state in every tier.  Shards are counted as ``ceil(n / world_size)``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if optimizer_tier not in PLAN_TIERS:
        raise ValueError(f"optimizer_tier={optimizer_tier!r}; expected one of {PLAN_TIERS}")
    c = model_or_counts
    if isinstance(c, Mapping):
        c = ParamCounts.from_mapping(c)
    elif not isinstance(c, ParamCounts):
        c = param_counts(c)
    pb, gb, gpb, ggb = _tier_dtypes(optimizer_tier, param_bytes, grad_bytes)
    s = optimizer_bytes_per_param(optimizer_tier, hybrid_bits, hybrid_cap)
    shard = lambda n: math.ceil(n / world_size)  # noqa: E731
    quant = c.total - c.fp32_state
    state = math.ceil(shard(quant) * s) + shard(c.fp32_state) * 8
    largest = max(c.units.values(), default=0)
    gather = 0
    if world_size > 1:
        gather = c.root * (gpb + ggb) + largest * (units_in_flight * gpb + ggb)
    return ShardedBytes(world_size, optimizer_tier, shard(c.total) * pb, shard(c.total) * gb, state, gather)


def gpus_needed(model_or_counts, optimizer_tier: str, gpu_bytes: int = GPU_80GB, *, activation_bytes: int = 0,
                max_world_size: int = 1 << 16, **kwargs: Any) -> int | None:
    """Smallest world size whose :func:`sharded_static_bytes` total plus
    ``activation_bytes`` fits ``gpu_bytes`` per GPU; ``None`` if none up to
    ``max_world_size`` does (the unsharded gather buffers alone do not fit)."""
    c = model_or_counts if isinstance(model_or_counts, (ParamCounts, Mapping)) else param_counts(model_or_counts)
    if isinstance(c, Mapping):
        c = ParamCounts.from_mapping(c)
    fits = lambda w: sharded_static_bytes(c, w, optimizer_tier, **kwargs).total + activation_bytes <= gpu_bytes  # noqa: E731
    if fits(1):
        return 1
    if not fits(max_world_size):
        return None
    lo, hi = 1, max_world_size  # fits(lo) False, fits(hi) True; total is non-increasing in w for w >= 2
    if fits(2):
        return 2
    lo = 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def format_plan(model: nn.Module | str, world_size: int | None = None, gpu_bytes: int = GPU_80GB,
                tiers: Iterable[str] = PLAN_TIERS, units: Sequence[str] | None = None, **kwargs: Any) -> str:
    """Markdown table: per tier, the smallest number of ``gpu_bytes`` GPUs (static
    bytes only) and, at that size (or at ``world_size`` if given), the per-GPU
    breakdown.  The ``unsloth-fx plan --world-size N`` answer."""
    from unsloth_fx.options import format_bytes

    name = model if isinstance(model, str) else type(model).__name__
    c = param_counts(model, units)
    largest = max(c.units.values(), default=0)
    lines = [f"{name}: {c.total / 1e9:.2f}B parameters ({c.fp32_state / 1e9:.2f}B with fp32 moments in every tier), "
             f"largest FSDP unit {largest / 1e9:.2f}B, root unit {c.root / 1e9:.2f}B; budget "
             f"{gpu_bytes / 1e9:g} GB per GPU, static bytes only (no activations)", "",
             "| tier | state B/param | min GPUs | at N | params/GPU | grads/GPU | optimizer/GPU | gather buffers "
             "| total/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for t in tiers:
        need = gpus_needed(c, t, gpu_bytes, **kwargs)
        w = world_size or need or 1024
        b = sharded_static_bytes(c, w, t, **kwargs)
        lines.append(f"| {t} | {optimizer_bytes_per_param(t):.4g} | {need if need else 'none fits'} | {w} | "
                     f"{format_bytes(b.params)} | {format_bytes(b.grads)} | {format_bytes(b.optimizer_state)} | "
                     f"{format_bytes(b.gather_buffers)} | {format_bytes(b.total)} |")
    return "\n".join(lines)


# -- HybridAdamW state through torch.distributed.checkpoint ------------------------------------

def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _param_keys(optim: torch.optim.Optimizer, model: nn.Module | None) -> list[str]:
    params = [p for g in optim.param_groups for p in g["params"]]
    if model is None:
        return [str(i) for i in range(len(params))]
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), str(i)) for i, p in enumerate(params)]


def optimizer_state_dict(optim: torch.optim.Optimizer, model: nn.Module | None = None) -> dict:
    """A ``torch.distributed.checkpoint``-ready state dict of ``optim`` (HybridAdamW).

    Each rank's state sits under its own keys (``state/<param>/rank<r>of<W>/<key>``):
    HybridAdamW's state is per local shard (codes and scales of the shard's own
    blocks), so it is not a slice of one global tensor and DCP must not deduplicate
    it.  Loading therefore needs the same world size and sharding (checked).
    Hyper-parameters (identical on all ranks) are saved once.
    """
    r, w = _rank_world()
    sd = optim.state_dict()
    keys = _param_keys(optim, model)
    out: dict[str, Any] = {"world_size": w}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, dict):
                continue  # last_gate: a report of the previous gate, not state
            out[f"state/{keys[idx]}/rank{r}of{w}/{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    for gi, g in enumerate(sd["param_groups"]):
        for k, v in g.items():
            if k in ("params", "param_names"):
                continue
            if k == "betas":
                for bi, b in enumerate(v):
                    out[f"groups/{gi}/betas{bi}"] = float(b)
            elif isinstance(v, torch.Tensor):
                out[f"groups/{gi}/{k}"] = float(v)
            else:
                out[f"groups/{gi}/{k}"] = v
    return out


def load_optimizer_state_dict(optim: torch.optim.Optimizer, state: Mapping[str, Any],
                              model: nn.Module | None = None) -> None:
    """Inverse of :func:`optimizer_state_dict` (after ``dcp.load`` filled it in place).

    Build the dict to load into with ``optimizer_state_dict`` of a *stepped or
    fresh* optimizer on this rank: keys that the fresh optimizer lacks are added
    by :func:`optimizer_state_template`."""
    r, w = _rank_world()
    if int(state.get("world_size", w)) != w:
        raise ValueError(f"optimizer state was saved with world size {state['world_size']}, loading with {w}: "
                         "HybridAdamW state is per local shard and cannot be resharded")
    keys = _param_keys(optim, model)
    sd = optim.state_dict()
    new_state: dict[int, dict] = {}
    for idx, key in enumerate(keys):
        prefix = f"state/{key}/rank{r}of{w}/"
        st = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if st:
            new_state[idx] = st
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        g = dict(g)
        for k in list(g):
            if k == "betas":
                g[k] = tuple(state.get(f"groups/{gi}/betas{bi}", float(b)) for bi, b in enumerate(g[k]))
            elif k not in ("params", "param_names") and f"groups/{gi}/{k}" in state:
                g[k] = state[f"groups/{gi}/{k}"]
        groups.append(g)
    optim.load_state_dict({"state": new_state, "param_groups": groups})


def optimizer_state_template(optim: torch.optim.Optimizer, model: nn.Module | None = None) -> dict:
    """The dict to pass to ``dcp.load`` for ``optim``: :func:`optimizer_state_dict`
    after materializing every parameter's state (zeros, from the tier set-up), so
    DCP knows each key's shape and dtype."""
    if hasattr(optim, "_init_state"):
        index = 0
        for g in optim.param_groups:
            names = g.get("param_names")
            for i, p in enumerate(g["params"]):
                index += 1
                if not optim.state[p]:
                    optim.state[p].update(optim._init_state(g, p, names[i] if names else None, index))
    return optimizer_state_dict(optim, model)
