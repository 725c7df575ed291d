"""Similar-weight detection: candidates, invariant sketches, a null distribution, alignment.

Pipeline for a set of named weights:

1. **Units and roles.** A unit is what may be shared: a 2-D weight (``matrix``), a
   dense SwiGLU block ``gate/up/down`` (``ffn``), or one routed expert of a fused
   ``experts.gate_up_proj`` / ``experts.down_proj`` pair (``expert``). Every unit is
   written as *blocks whose rows are permuted together*: a matrix is one block (its
   output rows), an FFN/expert is ``[gate, up, down^T]`` (rows = hidden neurons).
   The role is the name with the layer index replaced by ``*`` (experts: the layer's
   experts module, so experts pair only within one MoE layer). Candidates are pairs
   of units with the same role, kind, block shapes and dtype, never across roles.
2. **Screen** (no SVDs): for each block ``B`` (rows x cols) the Gram sketch
   ``S = (B Om)^T (B Om)`` with a fixed Gaussian ``Om`` (cols x k). ``S`` does not
   change under ``B -> Q B`` for any orthogonal ``Q`` acting on rows (signed
   permutations, block-orthogonal), so a pair related by such a ``Q`` scores ~0.
   Score = ||S_a - S_b||_F / mean(||S_a||, ||S_b||), averaged over blocks.
   **Null**: the same score between ``a`` and ``b R`` (and ``b`` and ``a R``) for K
   random signed column permutations ``R``: ``b R`` has exactly ``b``'s singular
   values and row norms (spectrum-matched) but unrelated input geometry. A pair is
   screened in when its score is below every null score and ``z < -z_min``.
   Row-norm spectra (sorted row norms, invariant under signed row permutation) are
   reported as a second statistic.
3. **Align** screened pairs with cheap transforms only: identity; signed row
   permutation (matrices; Hungarian on |cosine| of rows); joint neuron permutation of
   an FFN/expert (gate, up rows and down columns together; signs only on up rows with
   down columns, never through the SiLU gate); block-diagonal orthogonal with small
   blocks (matrices); then optionally a rank-r correction (matrices) from a
   randomized SVD of the residual.
4. **Accept** when storage(W1 + transform + correction) < (1 - tau) * (W1 + W2), the
   activation-weighted relative error is below ``tolerance``, and both weights have
   the same ``requires_grad``. Overlaps are resolved greedily by bytes saved: a
   freed weight cannot be a base, a base cannot be freed.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from unsloth_fx.sharing.report import Candidate, SeedPair, ShareReport

_LAYER_RE = re.compile(r"(^|\.)(layers|layer|h|blocks)\.(\d+)\.")
PERM_BYTES = 4  # permutation indices are stored as int32
SIGN_BYTES = 1  # signs are stored as int8


@dataclass
class Unit:
    """A shareable unit; ``blocks`` are neuron-row views (rows permute together)."""

    name: str
    role: str
    kind: str  # "matrix" | "ffn" | "expert"
    params: tuple[str, ...]  # parameter names (ffn: gate, up, down; expert: gate_up, down)
    blocks: list[torch.Tensor]  # on meta for shapes-only
    signed: tuple[bool, ...]  # which blocks may carry a sign flip
    requires_grad: bool
    layer: int | None = None
    expert: int | None = None
    keys: tuple[Any, ...] = ()  # identities of the storage it covers (for overlap resolution)
    sketch: torch.Tensor | None = None  # (nblocks, K+1, k*k)
    rownorm: list[torch.Tensor] = field(default_factory=list)

    @property
    def shapes(self) -> list[list[int]]:
        return [list(b.shape) for b in self.blocks]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    @property
    def on_meta(self) -> bool:
        return self.blocks[0].device.type == "meta"

    @property
    def rows(self) -> int:
        return self.blocks[0].shape[0]


def _layer_of(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.search(name)
    if not m:
        return None, name
    return int(m.group(3)), name[: m.start(3)] + "*" + name[m.end(3):]


def build_units(named: Mapping[str, torch.Tensor]) -> list[Unit]:
    """Units of ``named`` (parameter name -> tensor; meta tensors give shapes only)."""
    units: list[Unit] = []
    names = list(named)
    # FFN blocks: a module prefix with gate_proj/up_proj/down_proj weights.
    for n in names:
        if not n.endswith(".gate_proj.weight"):
            continue
        pre = n[: -len(".gate_proj.weight")]
        g, u, d = (named.get(f"{pre}.{p}_proj.weight") for p in ("gate", "up", "down"))
        if u is None or d is None or g.dim() != 2 or g.shape != u.shape or d.shape != (g.shape[1], g.shape[0]):
            continue
        layer, role = _layer_of(pre + ".")
        units.append(Unit(
            name=pre, role=role.rstrip(".") + "[ffn]", kind="ffn",
            params=(f"{pre}.gate_proj.weight", f"{pre}.up_proj.weight", f"{pre}.down_proj.weight"),
            blocks=[g.detach(), u.detach(), d.detach().t()], signed=(False, True, True),
            requires_grad=bool(g.requires_grad and u.requires_grad and d.requires_grad), layer=layer,
            keys=(f"{pre}.gate_proj.weight", f"{pre}.up_proj.weight", f"{pre}.down_proj.weight"),
        ))
    # Routed experts stored as 3-D tensors (transformers' fused layout, gate rows then up rows).
    for n in names:
        if not n.endswith("experts.gate_up_proj"):
            continue
        pre = n[: -len(".gate_up_proj")]
        gu, dn = named[n], named.get(f"{pre}.down_proj")
        if dn is None or gu.dim() != 3 or dn.dim() != 3 or gu.shape[1] % 2:
            continue
        e_count, two_i, hid = gu.shape
        inter = two_i // 2
        if tuple(dn.shape) != (e_count, hid, inter):
            continue
        layer, _ = _layer_of(pre + ".")
        for e in range(e_count):
            units.append(Unit(
                name=f"{pre}[{e}]", role=f"{pre}[expert]", kind="expert",
                params=(n, f"{pre}.down_proj"),
                blocks=[gu.detach()[e, :inter], gu.detach()[e, inter:], dn.detach()[e].t()],
                signed=(False, True, True), requires_grad=bool(gu.requires_grad and dn.requires_grad),
                layer=layer, expert=e, keys=((n, e), (f"{pre}.down_proj", e)),
            ))
    # Every 2-D weight on its own (an FFN's matrices too: one of them may match alone).
    for n in names:
        t = named[n]
        if t.dim() != 2 or min(t.shape) < 2:
            continue
        layer, role = _layer_of(n)
        units.append(Unit(name=n, role=role, kind="matrix", params=(n,), blocks=[t.detach()], signed=(True,),
                          requires_grad=bool(t.requires_grad), layer=layer, keys=(n,)))
    return units


class _Probes:
    """Fixed random probes per column count: ``Om`` and the null's signed column permutations."""

    def __init__(self, k: int, null_samples: int, seed: int):
        self.k, self.K, self.seed = k, null_samples, seed
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def get(self, cols: int, device: torch.device):
        key = (cols, str(device))
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + cols)
            om = torch.randn(cols, self.k, generator=g) / math.sqrt(cols)
            rs = []
            for _ in range(self.K):
                perm = torch.randperm(cols, generator=g)
                sign = torch.randint(0, 2, (cols,), generator=g).float() * 2 - 1
                rs.append((perm, sign))
            # B R Om = B (R Om): R Om is Om with rows permuted and signed, so all K+1 sketches
            # come from one GEMM against [Om, R_1 Om, ..., R_K Om].
            omega = torch.cat([om] + [om[p.argsort()] * s[:, None] for p, s in rs], dim=1)
            self._cache[key] = (omega.to(device), rs)
        return self._cache[key]


def _sketch_units(units: list[Unit], probes: _Probes, cache: dict | None = None) -> None:
    k = probes.k
    cache = {} if cache is None else cache  # an FFN's gate/up blocks are also single-matrix units
    for u in units:
        if u.on_meta or u.sketch is not None:
            continue
        sk = []
        for b in u.blocks:
            key = (b.device, b.data_ptr(), tuple(b.shape), b.stride())
            if key not in cache:
                omega, _ = probes.get(b.shape[1], b.device)
                y = (b.float() @ omega).view(b.shape[0], probes.K + 1, k)  # rows x (K+1) x k
                cache[key] = torch.einsum("rki,rkj->kij", y, y).reshape(probes.K + 1, k * k).cpu().double()
            sk.append(cache[key])
        u.sketch = torch.stack(sk)  # (nblocks, K+1, k*k)
        u.rownorm = [b.float().norm(dim=1).sort().values.cpu().double() for b in u.blocks]


def _pair_scores(group: list[Unit]) -> dict[str, torch.Tensor]:
    """Screen score, null scores and row-norm distances for all pairs of one role, vectorised."""
    S = torch.stack([u.sketch for u in group])  # (N, nb, K+1, k*k)
    N, nb, K1, _ = S.shape
    score = torch.zeros(N, N, dtype=torch.float64)
    null = torch.zeros(N, N, 2 * (K1 - 1), dtype=torch.float64)
    rn = torch.zeros(N, N, dtype=torch.float64)
    for b in range(nb):
        x0 = S[:, b, 0]
        n0 = x0.norm(dim=1)
        score += torch.cdist(x0, x0) / (0.5 * (n0[:, None] + n0[None, :])).clamp_min(1e-30)
        for k in range(1, K1):
            xk = S[:, b, k]
            nk = xk.norm(dim=1)
            dk = torch.cdist(x0, xk) / (0.5 * (n0[:, None] + nk[None, :])).clamp_min(1e-30)
            null[:, :, 2 * (k - 1)] += dk  # a vs b's random partner
            null[:, :, 2 * (k - 1) + 1] += dk.t()  # b vs a's random partner
        r = torch.stack([u.rownorm[b] for u in group])
        rn += torch.cdist(r, r) / r.norm(dim=1)[:, None].clamp_min(1e-30)
    return {"score": score / nb, "null": null / nb, "rownorm": rn / nb}


# ----------------------------------------------------------------------------- alignment


def _relres(target: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    num = sum(float((t - a).float().pow(2).sum()) for t, a in zip(target, approx))
    den = sum(float(t.float().pow(2).sum()) for t in target)
    return math.sqrt(num / max(den, 1e-30))


def _match_rows(A: list[torch.Tensor], B: list[torch.Tensor], signed: tuple[bool, ...], max_bound: float):
    """Best (perm, sign) with B[i] ~= sign[i] * A[perm[i]] per block; sign on signed blocks only.

    Returns (perm, sign, note). Hungarian (scipy) only when row-wise argmax is not
    already a permutation and the lower bound on the residual says it could pass.
    """
    def unit_rows(x):
        x = x.float()
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)

    sim_u = 0.0
    sim_s = 0.0
    for a, b, sg in zip(A, B, signed):
        c = unit_rows(b) @ unit_rows(a).t()  # rows of B x rows of A
        if sg:
            sim_s = sim_s + c
        else:
            sim_u = sim_u + c
    sim = sim_u + (sim_s.abs() if isinstance(sim_s, torch.Tensor) else 0.0)
    sgn_src = sim_s if isinstance(sim_s, torch.Tensor) else None
    best = sim.argmax(dim=1)
    if torch.unique(best).numel() == best.numel():
        perm, note = best, "argmax"
    else:
        # Lower bound: every row takes its best partner (allowing repeats). For unit rows the
        # per-block residual^2 of a matched row is 2 - 2 cos, averaged over blocks.
        nb = len(A)
        bound = math.sqrt(max(0.0, float((2 - 2 * sim.max(dim=1).values / nb).mean())) / 2)
        if bound > max_bound:
            return None, None, f"skipped Hungarian: residual lower bound {bound:.3g} > {max_bound:g}"
        from scipy.optimize import linear_sum_assignment

        _, cols = linear_sum_assignment(-sim.cpu().double().numpy())
        perm, note = torch.as_tensor(cols, device=sim.device), "hungarian"
    if sgn_src is None:
        sign = torch.ones(perm.numel(), device=perm.device)
    else:
        sign = torch.where(sgn_src.gather(1, perm[:, None]).squeeze(1) >= 0, 1.0, -1.0)
    return perm, sign, note


def _apply_perm(A: list[torch.Tensor], perm, sign, signed) -> list[torch.Tensor]:
    out = []
    for a, sg in zip(A, signed):
        x = a[perm]
        if sg:
            x = x * sign.to(a.dtype)[:, None]
        out.append(x)
    return out


def _block_orth(a: torch.Tensor, b: torch.Tensor, bs: int):
    """Per-block Procrustes: b[blk] ~= Q_blk a[blk] for contiguous row blocks of size ``bs``."""
    m, n = a.shape
    ab = a.float().reshape(m // bs, bs, n)
    bb = b.float().reshape(m // bs, bs, n)
    u, _, vh = torch.linalg.svd(bb @ ab.transpose(1, 2))
    q = u @ vh
    return q, (q @ ab).reshape(m, n).to(a.dtype)


def procrustes_residual(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative residual min_Q ||b - Q a|| / ||b|| over dense orthogonal Q (one SVD of b a^T)."""
    a, b = a.detach().double(), b.detach().double()
    s = torch.linalg.svdvals(b @ a.t())
    r2 = float(b.pow(2).sum() + a.pow(2).sum() - 2 * s.sum())
    return math.sqrt(max(r2, 0.0) / float(b.pow(2).sum()))


def _null_partner(blocks: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Spectrum-matched random partner: a random signed permutation of the columns."""
    g = torch.Generator().manual_seed(seed)
    cols = blocks[0].shape[1]
    perm = torch.randperm(cols, generator=g).to(blocks[0].device)
    sign = (torch.randint(0, 2, (cols,), generator=g).float() * 2 - 1).to(blocks[0].device)
    return [b[:, perm] * sign.to(b.dtype) for b in blocks]


# ----------------------------------------------------------------------------- errors


def _calib_input(u: Unit, calibration: Mapping[str, torch.Tensor] | None, n: int, seed: int) -> torch.Tensor:
    cols = u.blocks[0].shape[1]
    x = None
    if calibration is not None:
        key = u.params[0] if u.kind == "matrix" else u.params[0].rsplit(".", 2)[0] if u.kind == "ffn" else u.params[0]
        x = calibration.get(key)
        if x is None and u.kind == "ffn":
            x = calibration.get(u.params[0])
    if x is None:
        g = torch.Generator().manual_seed(seed + cols)
        x = torch.randn(n, cols, generator=g)
    return x.reshape(-1, cols).to(u.blocks[0].device, torch.float32)


def _unit_out(blocks: list[torch.Tensor], kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "matrix":
        return x @ blocks[0].float().t()
    g, up, dt = (b.float() for b in blocks)
    return (F.silu(x @ g.t()) * (x @ up.t())) @ dt


def _act_err(ref: list[torch.Tensor], approx: list[torch.Tensor], kind: str, x: torch.Tensor) -> float:
    y = _unit_out(ref, kind, x)
    y_hat = _unit_out(approx, kind, x)
    return float((y - y_hat).norm() / y.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- main entry


def _transform_bytes(u: Unit, name: str) -> int:
    rows, cols = u.blocks[0].shape
    elt = u.blocks[0].element_size()
    if name == "identity":
        return 0
    if name in ("signed_perm", "neuron_perm"):
        # experts also store which kept expert they come from (one int32)
        return rows * (PERM_BYTES + SIGN_BYTES) + (PERM_BYTES if u.kind == "expert" else 0)
    if name.startswith("block_orth"):
        bs = int(name[len("block_orth"):])
        return rows * bs * elt
    raise ValueError(name)


def _align(a: Unit, b: Unit, *, tolerance: float, tau: float, max_rank: int, block_sizes: tuple[int, ...],
           x: torch.Tensor, hungarian_bound: float) -> dict[str, Any]:
    """Best cheap transform (+ correction) for b ~= T(a); returns fields for the Candidate."""
    A, B = a.blocks, b.blocks
    options: list[tuple[str, list[torch.Tensor], dict[str, Any]]] = [("identity", list(A), {})]
    notes = []
    perm, sign, note = _match_rows(A, B, a.signed, hungarian_bound)
    if perm is None:
        notes.append(note)
    elif not torch.equal(perm, torch.arange(perm.numel(), device=perm.device)) or bool((sign < 0).any()):
        name = "signed_perm" if a.kind == "matrix" else "neuron_perm"
        options.append((name, _apply_perm(A, perm, sign, a.signed), {"perm": perm, "sign": sign}))
    if a.kind == "matrix":
        for bs in block_sizes:
            if a.rows % bs == 0 and bs < a.rows:
                q, approx = _block_orth(A[0], B[0], bs)
                options.append((f"block_orth{bs}", [approx], {"blocks": q.to(A[0].dtype), "block_size": bs}))
    best = None  # (passes, storage or residual, fields)
    # A low-rank correction (one randomized SVD each) is fitted on top of identity and of the
    # other transform with the smallest residual; the rest are judged as they are.
    resid = [_relres(B, ap) for _, ap, _ in options]
    fit_rank = {0} | set(sorted(range(1, len(options)), key=lambda i: resid[i])[:1])
    for i, (name, approx, extra) in enumerate(options):
        fields = _fit_option(a, b, name, approx, extra, tolerance=tolerance, tau=tau,
                             max_rank=max_rank if i in fit_rank else 0, x=x)
        ok = fields["act_err"] < tolerance
        # Passing options: weight-exact reconstructions first (an FFN with permuted neurons is
        # also matched *functionally* by identity, but then the weights differ), then the cheapest.
        key = (not ok, fields["residual"] > 1e-5 if ok else 0, fields["transform_bytes"] if ok else fields["residual"])
        if best is None or key < best[0]:
            best = (key, fields)
    out = best[1]
    out["notes"] = notes
    return out


def _fit_option(a: Unit, b: Unit, name: str, approx: list[torch.Tensor], extra: dict[str, Any], *,
                tolerance: float, tau: float, max_rank: int, x: torch.Tensor) -> dict[str, Any]:
    """One transform, plus the smallest rank-r correction (matrices) that meets the tolerance."""
    B = b.blocks
    res = _relres(B, approx)
    tbytes = _transform_bytes(a, name)
    err = _act_err(B, approx, a.kind, x)
    out = {"transform": name, "residual_transform": res, "residual": res, "transform_bytes": tbytes, "rank": 0,
           "extra": extra, "approx": approx, "act_err": err}
    budget = (1 - tau) * (a.nbytes + b.nbytes) - a.nbytes - tbytes  # bytes a correction may take
    if err < tolerance or a.kind != "matrix" or max_rank <= 0 or budget <= 0:
        return out
    m, n = B[0].shape
    elt = B[0].element_size()
    r_cap = min(max_rank, int(budget // ((m + n) * elt)), min(m, n) - 1)
    if r_cap < 1:
        return out
    resid = B[0].float() - approx[0].float()
    g = torch.Generator(device="cpu").manual_seed(0)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # svd_lowrank draws from the global RNG
    try:
        U, S, V = torch.svd_lowrank(resid, q=min(r_cap + 8, min(m, n)), niter=2)
    finally:
        torch.random.set_rng_state(torch_state)
    for r in sorted({r for r in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, r_cap) if r <= r_cap}):
        left = (U[:, :r] * S[:r]).to(B[0].dtype)
        right = V[:, :r].t().contiguous().to(B[0].dtype)
        corr = [approx[0] + left @ right]
        e = _act_err(B, corr, a.kind, x)
        if e < tolerance:
            out.update(rank=r, act_err=e, residual=_relres(B, corr), approx=corr,
                       transform_bytes=tbytes + r * (m + n) * elt, extra={**extra, "left": left, "right": right})
            break
    return out


def find_shared_tensors(
    named: Mapping[str, torch.Tensor],
    *,
    tolerance: float = 0.01,
    tau: float = 0.1,
    calibration: Mapping[str, torch.Tensor] | None = None,
    calib_samples: int = 256,
    sketch_dim: int = 32,
    null_samples: int = 8,
    z_min: float = 3.0,
    max_rank: int = 64,
    block_sizes: tuple[int, ...] = (2, 8),
    hungarian_bound: float = 0.5,
    max_aligned: int = 512,
    tied: Iterable[Iterable[str]] = (),
    already_shared: Iterable[str] = (),
    seed: int = 0,
) -> ShareReport:
    """Detect sharing among ``named`` (name -> weight tensor, real or on meta).

    ``tolerance``: accepted activation-weighted relative error. ``tau``: storage after
    sharing must be below ``(1 - tau)`` of the pair's. ``calibration``: name -> input
    activations (rows = samples) for the unit's first parameter (FFN: the module prefix
    or its gate weight); missing ones use ``calib_samples`` N(0, I) rows (stated in the
    report). Deterministic for a fixed ``seed``.
    """
    t0 = time.perf_counter()
    units = build_units(named)
    on_meta = any(u.on_meta for u in units)
    calib_text = "random N(0, I) inputs, %d samples per unit" % calib_samples
    if calibration:
        calib_text = f"provided activations for {len(calibration)} weights; random N(0, I) for the rest"
    report = ShareReport(mode="shapes-only" if on_meta else "values", tolerance=tolerance, tau=tau,
                         calibration=calib_text, null_samples=null_samples, sketch_dim=sketch_dim,
                         tied=[list(t) for t in tied], already_shared=list(already_shared))
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.role, u.kind, tuple(map(tuple, u.shapes)), u.blocks[0].dtype), []).append(u)
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    probes = _Probes(sketch_dim, null_samples, seed)
    sketch_cache: dict = {}
    pending: list[tuple[Candidate, Unit, Unit]] = []
    for (role, kind, shapes, dtype), group in groups.items():
        meta = any(u.on_meta for u in group)
        if not meta:
            _sketch_units(group, probes, sketch_cache)
            sc = _pair_scores(group)
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                c = Candidate(role=role, kind=kind, base=a.name, freed=b.name, shape=[list(s) for s in shapes],
                              dtype=str(dtype).replace("torch.", ""), bytes_freed=b.nbytes)
                report.candidates.append(c)
                if meta:
                    c.verdict, c.reason = "shapes-only", "parameters on meta: no values to compare"
                    continue
                nl = sc["null"][i, j]
                c.score, c.row_norm_dist = float(sc["score"][i, j]), float(sc["rownorm"][i, j])
                c.null_min, c.null_mean, c.null_std = float(nl.min()), float(nl.mean()), float(nl.std())
                c.z = (c.score - c.null_mean) / max(c.null_std, 1e-30)
                c.screened = c.score < c.null_min and c.z < -z_min
                if not c.screened:
                    c.reason = "not screened in (score not below the null)"
                    continue
                pending.append((c, a, b))
    if on_meta:
        report.notes.append("parameters are on meta (or fake): candidates listed from shapes only, nothing screened")
    pending.sort(key=lambda t: t[0].score)
    for n_done, (c, a, b) in enumerate(pending):
        if n_done >= max_aligned:
            c.reason = f"screened in, not aligned (max_aligned={max_aligned})"
            continue
        x = _calib_input(b, calibration, calib_samples, seed)
        al = _align(a, b, tolerance=tolerance, tau=tau, max_rank=max_rank, block_sizes=block_sizes, x=x,
                    hungarian_bound=hungarian_bound)
        c.transform, c.rank = al["transform"], al["rank"]
        c.residual_transform, c.residual, c.act_err = al["residual_transform"], al["residual"], al["act_err"]
        c.transform_bytes = al["transform_bytes"]
        c.bytes_saved_if_applied = c.bytes_freed - c.transform_bytes
        nullb = _null_partner(b.blocks, seed + 17)
        c.residual_null = _relres(nullb, _align_quick(a, nullb, al["transform"], hungarian_bound))
        after = a.nbytes + c.transform_bytes
        if a.requires_grad != b.requires_grad:
            c.reason = "requires_grad differs (frozen vs trainable): sharing would train the frozen use"
        elif c.act_err >= tolerance:
            c.reason = f"activation error {c.act_err:.3g} >= tolerance {tolerance:g}" + (
                f" ({'; '.join(al['notes'])})" if al["notes"] else "")
        elif after >= (1 - tau) * (a.nbytes + b.nbytes):
            c.reason = f"storage {after} B not below (1 - tau) x {a.nbytes + b.nbytes} B"
        else:
            c.verdict = "accepted"
            c.payload = {"base": a, "freed": b, **al["extra"]}
    _resolve_overlaps(report)
    _add_overheads(report)
    report.seed_pairs = seed_pairs(named, seed=seed)
    report.seconds = time.perf_counter() - t0
    return report


def _align_quick(a: Unit, nullb: list[torch.Tensor], transform: str, bound: float) -> list[torch.Tensor]:
    """The same transform family fitted to a null partner (for the report's residual_null)."""
    if transform in ("signed_perm", "neuron_perm"):
        perm, sign, _ = _match_rows(a.blocks, nullb, a.signed, bound)
        if perm is None:  # the bound already says no signed permutation fits the null partner
            return list(a.blocks)
        return _apply_perm(a.blocks, perm, sign, a.signed)
    if transform.startswith("block_orth"):
        return [_block_orth(a.blocks[0], nullb[0], int(transform[len("block_orth"):]))[1]]
    return list(a.blocks)


def _resolve_overlaps(report: ShareReport) -> None:
    acc = [c for c in report.candidates if c.verdict == "accepted"]
    acc.sort(key=lambda c: (-c.bytes_saved_if_applied, c.score))
    freed: set = set()
    bases: set = set()
    for c in acc:
        a, b = c.payload["base"], c.payload["freed"]
        if any(k in freed or k in bases for k in b.keys) or any(k in freed for k in a.keys):
            c.verdict, c.reason, c.payload = "rejected", "overlaps a larger accepted pair (base freed or freed is a base)", None
            continue
        freed.update(b.keys)
        bases.update(a.keys)
        c.bytes_saved = c.bytes_saved_if_applied


def _add_overheads(report: ShareReport) -> None:
    # Experts of one layer share an index map (expert -> stored slot), int32 per expert,
    # stored once per fused tensor pair.
    layers: dict[str, int] = {}
    for c in report.accepted:
        if c.kind == "expert":
            u = c.payload["freed"]
            layers[u.role] = u.params
    for role, params in sorted(layers.items()):
        e_count = None
        for c in report.candidates:
            if c.role == role:
                e_count = max(e_count or 0, int(c.freed.rsplit("[", 1)[1][:-1]) + 1)
        report.overheads.append({"what": f"{role} expert index map (int32 x {e_count})", "bytes": e_count * PERM_BYTES,
                                 "params": list(params)})


def seed_pairs(named: Mapping[str, torch.Tensor], seed: int = 0) -> list[SeedPair]:
    """The seed's Q(L) / K(L+1) pairs with a dense orthogonal Q, measured (shapes permitting)."""
    out = []
    qs = {}
    for n, t in named.items():
        layer, role = _layer_of(n)
        if layer is not None and role.endswith("q_proj.weight"):
            qs[layer] = n
    for layer in sorted(qs):
        qn = qs[layer]
        kn = qn.replace(f".{layer}.", f".{layer + 1}.", 1).replace("q_proj", "k_proj")
        q = named[qn]
        k = named.get(kn)
        if k is None:
            if any(_layer_of(n)[0] == layer + 1 for n in named):
                out.append(SeedPair(qn, kn, list(q.shape), [], verdict="not applicable: no k_proj (e.g. MLA)"))
            continue
        p = SeedPair(qn, kn, list(q.shape), list(k.shape))
        if q.shape != k.shape:
            p.verdict = f"not applicable: shapes differ {tuple(q.shape)} vs {tuple(k.shape)} (GQA)"
        elif q.device.type == "meta":
            p.verdict = "shapes only (meta)"
        else:
            d = q.shape[0]
            p.q_bytes = d * d * q.element_size()
            p.residual = procrustes_residual(q, k)
            p.residual_null = procrustes_residual(q, _null_partner([k], seed + layer)[0])
            p.verdict = (f"rejected: dense Q stores {p.q_bytes} B, W itself is {q.numel() * q.element_size()} B "
                         "(no saving); residual vs null shown")
        out.append(p)
    return out
