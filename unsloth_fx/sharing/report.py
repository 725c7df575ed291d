"""The sharing report: every candidate pair, its screen score against the null,
its alignment residual, the bytes it would save, and the verdict.

``ShareReport.to_dict()`` is the JSON written to the dump as
``share_weights.json`` (schema ``SCHEMA``); ``to_markdown()`` is
``share_weights.md`` and the table printed on stdout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from unsloth_fx.options import format_bytes

SCHEMA = "unsloth_fx.share_report/1"

# Printed once in every report: sharing is not a free optimisation.
CHANGES_MODEL_NOTE = (
    "Applying sharing changes the model: the freed weight is replaced by a transform of the kept "
    "one (plus an optional trainable low-rank correction), the two uses then train one parameter "
    "together, and the state_dict layout changes. Exact transforms (identity, permutations, sign "
    "flips) reproduce the weights bit for bit at apply time; approximate ones only within "
    "share_tolerance."
)


@dataclass
class Candidate:
    """One same-role, same-shape pair: ``freed`` ~= transform(``base``).

    Scores are relative Frobenius distances between invariant Gram sketches
    (0 = indistinguishable under W -> QW); ``null_*`` summarise the same score
    for spectrum-matched random partners. ``residual`` is ||W2 - T(W1) - corr|| / ||W2||;
    ``act_err`` the activation-weighted relative error (see ShareReport.calibration).
    Bytes are storage bytes of the weights in their dtype.
    """

    role: str
    kind: str  # "matrix" | "ffn" | "expert"
    base: str
    freed: str
    shape: list[list[int]]  # shapes of the unit's blocks (neuron rows x inputs)
    dtype: str
    score: float | None = None
    null_min: float | None = None
    null_mean: float | None = None
    null_std: float | None = None
    z: float | None = None
    row_norm_dist: float | None = None
    screened: bool = False
    transform: str | None = None  # identity | signed_perm | neuron_perm | block_orth{b} (+rank r)
    rank: int = 0
    residual_transform: float | None = None  # before the low-rank correction
    residual: float | None = None
    residual_null: float | None = None  # same alignment against a spectrum-matched random partner
    act_err: float | None = None
    bytes_freed: int = 0  # bytes of the freed weight(s)
    transform_bytes: int = 0  # index/sign/block/correction storage that replaces them
    bytes_saved: int = 0  # bytes_freed - transform_bytes when accepted (0 otherwise)
    bytes_saved_if_applied: int = 0  # what accepting it would save (reported even when rejected)
    verdict: str = "rejected"  # "accepted" | "rejected" | "shapes-only"
    reason: str = ""
    payload: Any = field(default=None, repr=False)  # tensors for apply; never serialised

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "payload"}
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = float(f"{v:.6g}")
        return d


@dataclass
class SeedPair:
    """The seed's proposal, measured: dense orthogonal Q with K(L+1) ~= Q Q(L)."""

    q: str
    k: str
    q_shape: list[int]
    k_shape: list[int]
    residual: float | None = None  # Procrustes relative residual
    residual_null: float | None = None  # same, against a spectrum-matched random partner
    q_bytes: int | None = None  # bytes of the dense Q it would store
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ShareReport:
    mode: str  # "values" or "shapes-only"
    tolerance: float
    tau: float
    calibration: str
    null_samples: int
    sketch_dim: int
    candidates: list[Candidate] = field(default_factory=list)
    overheads: list[dict[str, Any]] = field(default_factory=list)  # per-layer index maps etc.
    tied: list[list[str]] = field(default_factory=list)
    already_shared: list[str] = field(default_factory=list)
    seed_pairs: list[SeedPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accepted(self) -> list[Candidate]:
        return [c for c in self.candidates if c.verdict == "accepted"]

    @property
    def total_bytes_saved(self) -> int:
        """Predicted change in parameter + buffer bytes if applied (overheads subtracted)."""
        return sum(c.bytes_saved for c in self.accepted) - sum(o["bytes"] for o in self.overheads)

    def summary(self) -> dict[str, Any]:
        return {
            "candidates": len(self.candidates),
            "screened": sum(c.screened for c in self.candidates),
            "accepted": len(self.accepted),
            "bytes_saved_if_applied": self.total_bytes_saved,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "mode": self.mode,
            "tolerance": self.tolerance,
            "tau": self.tau,
            "calibration": self.calibration,
            "null_samples": self.null_samples,
            "sketch_dim": self.sketch_dim,
            "summary": self.summary(),
            "changes_model": CHANGES_MODEL_NOTE,
            "tied": self.tied,
            "already_shared": self.already_shared,
            "notes": self.notes,
            "overheads": self.overheads,
            "seed_pairs": [s.to_dict() for s in self.seed_pairs],
            "candidates": [c.to_dict() for c in self.candidates],
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def to_markdown(self, max_rows: int | None = None) -> str:
        """Markdown: summary, then a table of candidates (accepted and screened first).

        ``max_rows`` bounds the table; the rest are summarised per role (the
        JSON always lists every candidate).
        """
        s = self.summary()
        out = [
            "# share_weights report",
            "",
            f"mode: {self.mode}; tolerance {self.tolerance:g} (activation-weighted relative error); "
            f"tau {self.tau:g} (storage must shrink below {1 - self.tau:g} x the pair); "
            f"calibration: {self.calibration}; null: {self.null_samples} spectrum-matched random partners per "
            f"weight, sketch dim {self.sketch_dim}.",
            "",
            f"{s['candidates']} candidate pairs, {s['screened']} screened in, {s['accepted']} accepted; "
            f"bytes saved if applied: {s['bytes_saved_if_applied']} ({format_bytes(s['bytes_saved_if_applied'])}).",
            "",
            f"> {CHANGES_MODEL_NOTE}",
            "",
        ]
        if not self.candidates:
            out += ["No candidates: no two weights share both role and shape.", ""]
        for t in self.tied:
            out.append(f"- already tied (one tensor, not a candidate): {' = '.join(t)}")
        for a in self.already_shared:
            out.append(f"- already shared by apply_sharing: {a}")
        for n in self.notes:
            out.append(f"- {n}")
        if self.tied or self.already_shared or self.notes:
            out.append("")
        order = sorted(
            range(len(self.candidates)),
            key=lambda i: (self.candidates[i].verdict != "accepted", not self.candidates[i].screened, i),
        )
        rows = order if max_rows is None else order[:max_rows]
        if rows:
            out += [
                "| role | base | freed | score | null min/mean | z | transform | residual (null) | act err | bytes saved | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]

        def f(x: float | None, fmt: str = ".3g") -> str:
            return "-" if x is None else format(x, fmt)

        for i in rows:
            c = self.candidates[i]
            tr = "-" if c.transform is None else c.transform + (f"+rank{c.rank}" if c.rank else "")
            null = "-" if c.null_min is None else f"{c.null_min:.3g}/{c.null_mean:.3g}"
            res = "-" if c.residual is None else f"{c.residual:.3g} ({f(c.residual_null)})"
            saved = c.bytes_saved if c.verdict == "accepted" else c.bytes_saved_if_applied
            verdict = c.verdict + (f": {c.reason}" if c.reason else "")
            out.append(
                f"| {c.role} | {c.base} | {c.freed} | {f(c.score)} | {null} | {f(c.z, '.1f')} | {tr} | {res} | "
                f"{f(c.act_err)} | {saved} | {verdict} |"
            )
        rest = order[len(rows):]
        if rest:
            by_role: dict[str, int] = {}
            for i in rest:
                by_role[self.candidates[i].role] = by_role.get(self.candidates[i].role, 0) + 1
            out += ["", f"{len(rest)} more candidates (all in share_weights.json):"]
            out += [f"- {r}: {n}" for r, n in sorted(by_role.items())]
        for o in self.overheads:
            out.append(f"- overhead: {o['what']} ({o['bytes']} B)")
        if self.seed_pairs:
            out += ["", "## The seed's pairs: K(L+1) = Q Q(L), Q dense orthogonal", "",
                    "| q | k | residual | null residual | dense Q bytes | verdict |", "|---|---|---|---|---|---|"]
            for p in self.seed_pairs:
                out.append(f"| {p.q} | {p.k} | {f(p.residual)} | {f(p.residual_null)} | {p.q_bytes or '-'} | {p.verdict} |")
        out += ["", f"detection took {self.seconds:.2f} s", ""]
        return "\n".join(out)
