"""Similar-weight detection and sharing (DESIGN.md, technique 1), done honestly.

    report = find_shared(model, tolerance=0.01)   # detect: every candidate, scored against a null
    print(report.to_markdown())
    apply_sharing(model, report)                   # optional: changes the model, frees memory
    model = torch.compile(model, backend="unsloth")

See docs/sharing.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from unsloth_fx.sharing.apply import DerivedMatrix, ExpertStack, apply_sharing, is_shared, storage_bytes
from unsloth_fx.sharing.detect import build_units, find_shared_tensors, procrustes_residual, seed_pairs
from unsloth_fx.sharing.report import Candidate, SeedPair, ShareReport

__all__ = [
    "Candidate", "DerivedMatrix", "ExpertStack", "SeedPair", "ShareReport", "apply_sharing", "build_units",
    "calibrate", "find_shared", "find_shared_tensors", "is_shared", "named_weights", "procrustes_residual",
    "seed_pairs", "storage_bytes",
]


def named_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]], list[str]]:
    """(name -> parameter, tied groups, already-shared names) for ``model``.

    Tied parameters (one tensor under several names) are kept once, under the
    first name, and listed; parameters that ``apply_sharing`` already rewrote
    are listed and left out.
    """
    groups: dict[int, list[str]] = {}
    first: dict[int, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
        first.setdefault(id(p), p)
    named, tied, shared = {}, [], []
    for pid, names in groups.items():
        plain = [n for n in names if "._ufx_" not in n]
        if len(plain) < len(names):
            shared.append(" = ".join(names))
            continue
        if len(names) > 1:
            tied.append(names)
        named[names[0]] = first[pid]
    return named, tied, shared


def find_shared(model: nn.Module, tolerance: float = 0.01, *, calibration: Mapping[str, torch.Tensor] | None = None,
                **kwargs: Any) -> ShareReport:
    """Detect similar weights in ``model`` (real or meta parameters). See ``find_shared_tensors``."""
    named, tied, shared = named_weights(model)
    return find_shared_tensors(named, tolerance=tolerance, calibration=calibration, tied=tied,
                               already_shared=shared, **kwargs)


@torch.no_grad()
def calibrate(model: nn.Module, *args: Any, samples: int = 512, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Run ``model(*args, **kwargs)`` once and capture the inputs of every ``nn.Linear``
    (key: its weight's name) and of every fused experts module (key: its
    ``gate_up_proj`` name; all tokens reaching the MoE, not only the routed ones).
    At most ``samples`` rows each, float32 on CPU.
    """
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for mname, mod in model.named_modules():
        key = None
        if isinstance(mod, nn.Linear):
            key = f"{mname}.weight"
        elif isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and getattr(mod, "gate_up_proj").dim() == 3:
            key = f"{mname}.gate_up_proj"
        if key is None:
            continue

        def hook(_m, inp, _k=key):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])[:samples].float().cpu()
            out[_k] = x

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    # An FFN's input is its gate_proj's input.
    for k in list(out):
        if k.endswith(".gate_proj.weight"):
            out[k[: -len(".gate_proj.weight")]] = out[k]
    return out
