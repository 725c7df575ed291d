"""Backend options: one typed, frozen record built from ``options=`` and
``UNSLOTH_FX_*`` environment variables (explicit options win).

Every bad key or value raises ``OptionError`` naming the key, the value and
what would be valid.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

ENV_PREFIX = "UNSLOTH_FX_"

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


class OptionError(ValueError):
    """A bad backend option."""


def parse_bytes(value: Any, *, key: str = "memory_budget") -> int | float | None:
    """``"7GiB"`` -> 7516192768; ``3e9`` -> 3000000000; ``0.5`` -> 0.5 (a
    fraction of device memory, resolved later); ``None`` -> None (no budget)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise OptionError(f"{key}={value!r}: expected bytes (int), a size like '7GiB', or a fraction in (0, 1]")
    if isinstance(value, (int, float)):
        num, unit = float(value), ""
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise OptionError(
                f"{key}={value!r}: expected bytes (int), a size like '7GiB' / '512MiB', or a fraction in (0, 1]"
            )
        num, unit = float(m.group(1)), m.group(2).lower()
        if unit not in _UNITS and unit != "":
            raise OptionError(f"{key}={value!r}: unknown unit {m.group(2)!r}; use one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    if unit == "" and 0 < num <= 1:
        return num  # fraction of device memory
    if num <= 0:
        raise OptionError(f"{key}={value!r}: must be positive")
    return int(num * _UNITS.get(unit, 1))


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _parse_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{key}={v!r}: expected a boolean (true/false, 1/0, on/off)")


def _choice(key: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise OptionError(f"{key}={v!r}: expected one of {', '.join(repr(c) for c in choices)}")
    return v


def _tolerance(key: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise OptionError(f"{key}={v!r}: expected a number in (0, 1)") from None
    if not 0 < f < 1:
        raise OptionError(f"{key}={v!r}: expected a number in (0, 1)")
    return f


@dataclass(frozen=True)
class Options:
    """Typed backend options. See the README's options table."""

    memory_budget: int | float | None = None  # bytes, or a fraction (0, 1] of device memory; None: no budget
    share_weights: str = "off"  # "off" | "report" | "apply"
    share_tolerance: float = 0.01  # activation-weighted relative error accepted for a shared pair
    fuse_optimizer: bool = False  # run optimizer updates inside the backward graph
    lower: str = "inductor"  # "inductor" | "eager"
    dump: str | None = None  # directory for per-pass graphs, schedule and stats
    pipeline: str = "default"  # a pipeline string, e.g. "default,+my_pass"
    verify: bool | None = None  # check graph invariants between passes; None: on under pytest
    progress: float = 5.0  # seconds: a pass, partition or lowering that takes this long is announced on stderr

    @property
    def verify_enabled(self) -> bool:
        if self.verify is not None:
            return self.verify
        return "PYTEST_CURRENT_TEST" in os.environ

    def resolve_budget(self, device_total_bytes: int | None) -> int | None:
        """The budget in bytes; fractions need the device's total memory."""
        b = self.memory_budget
        if b is None or isinstance(b, int):
            return b
        if device_total_bytes is None:
            raise OptionError(
                f"memory_budget={b!r} is a fraction of device memory, but the device's memory is unknown "
                "(CPU or meta); give bytes instead, e.g. '7GiB'"
            )
        return int(b * device_total_bytes)

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "Options":
        """Build from ``UNSLOTH_FX_*`` variables, then ``options`` on top."""
        env = os.environ if env is None else env
        fields = {f.name for f in dataclasses.fields(cls)}
        raw: dict[str, Any] = {}
        for k, v in env.items():
            if k.startswith(ENV_PREFIX):
                key = k[len(ENV_PREFIX):].lower()
                if key in fields:
                    raw[key] = v
                # other UNSLOTH_FX_* variables (e.g. UNSLOTH_FX_LOG) belong to other parts
        for k, v in dict(options or {}).items():
            if k not in fields:
                raise OptionError(f"unknown option {k!r}; valid options: {', '.join(sorted(fields))}")
            raw[k] = v
        return cls._validated(raw)

    @classmethod
    def _validated(cls, raw: dict[str, Any]) -> "Options":
        out: dict[str, Any] = {}
        for k, v in raw.items():
            if k == "memory_budget":
                out[k] = parse_bytes(v)
            elif k == "share_weights":
                out[k] = _choice(k, v, ("off", "report", "apply"))
            elif k == "share_tolerance":
                out[k] = _tolerance(k, v)
            elif k in ("fuse_optimizer",):
                out[k] = _parse_bool(k, v)
            elif k == "verify":
                out[k] = None if v is None else _parse_bool(k, v)
            elif k == "progress":
                try:
                    out[k] = float(v)
                except (TypeError, ValueError):
                    raise OptionError(f"progress={v!r}: expected seconds (a number; negative: never)") from None
            elif k == "lower":
                out[k] = _choice(k, v, ("inductor", "eager"))
            elif k == "dump":
                out[k] = None if v in (None, "") else os.fspath(v)
            elif k == "pipeline":
                from unsloth_fx.pipeline import Pipeline

                if not isinstance(v, str):
                    raise OptionError(f"pipeline={v!r}: expected a pipeline string such as 'default,+my_pass'")
                try:
                    Pipeline.parse(v)
                except ValueError as e:
                    raise OptionError(f"pipeline={v!r}: {e}") from None
                out[k] = v
        return cls(**out)
