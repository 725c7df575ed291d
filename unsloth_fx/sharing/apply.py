"""Module surgery: make accepted pairs one parameter used in two places.

Parameters are module state, so sharing happens on the ``nn.Module`` before
``torch.compile`` (the backend only sees the traced graph and cannot free a
parameter). For each accepted pair the freed weight is deleted and its module
computes it from the kept parameter on every forward:

- a 2-D weight (``nn.Linear`` or any module attribute): the module's class is
  swapped for a subclass whose ``weight`` is a property returning
  ``T(base) (+ left @ right)``; the base ``Parameter`` object is registered in
  the derived module too (the usual tying idiom: ``parameters()`` yields it once);
- an FFN: the same for gate/up/down, sharing one permutation and sign buffer;
- experts of a fused ``experts.gate_up_proj`` / ``down_proj`` pair: the 3-D
  parameters shrink to the kept experts; the full tensors are rebuilt by an
  index/sign gather.

Gradients of the shared parameter are the sum of both uses' contributions
(autograd through the gather). The rebuilt weight exists transiently during
forward (and, in eager autograd, is saved for backward like any weight
activation); parameter, gradient and optimizer-state bytes shrink. Create the
optimizer *after* ``apply_sharing``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unsloth_fx.sharing.report import ShareReport

SHARED_ATTR = "_ufx_shared"  # set on base parameters and transform buffers: "already shared"


class DerivedMatrix(nn.Module):
    """``W = sign * base_rows[perm]`` (or a block-orthogonal mix) ``+ left @ right``.

    ``transpose``: the base is stored (cols x rows) (an FFN's down_proj, whose
    neurons are columns); the transform acts on ``base.t()`` and the result is
    transposed back.
    """

    def __init__(self, base: nn.Parameter, *, perm=None, sign=None, blocks=None, left=None, right=None,
                 transpose: bool = False):
        super().__init__()
        self.base = base  # the same Parameter object as the kept module's weight
        self.transpose = transpose
        self.has_perm = perm is not None
        self.has_sign = sign is not None
        self.has_blocks = blocks is not None
        self.has_corr = left is not None
        if perm is not None:
            self.register_buffer("perm", perm)
        if sign is not None:
            self.register_buffer("sign", sign)
        if blocks is not None:
            self.register_buffer("blocks", blocks)
        if left is not None:
            self.left = nn.Parameter(left, requires_grad=base.requires_grad)
            self.right = nn.Parameter(right, requires_grad=base.requires_grad)

    def forward(self) -> torch.Tensor:
        w = self.base.t() if self.transpose else self.base
        if self.has_perm:
            w = w[self.perm.long()]
        if self.has_sign:
            w = w * self.sign.to(w.dtype)[:, None]
        if self.has_blocks:
            nb, bs, _ = self.blocks.shape
            w = (self.blocks @ w.reshape(nb, bs, -1)).reshape(nb * bs, -1)
        if self.has_corr:
            w = w + self.left @ self.right
        # Contiguous like the parameter it replaces, so matmuls take the same kernels (bitwise logits).
        return w.t().contiguous() if self.transpose else w


class ExpertStack(nn.Module):
    """Rebuild a fused expert tensor from its kept experts.

    ``part="gate_up"``: base (E', 2I, H), neurons are rows (gate rows, then up rows);
    ``part="down"``: base (E', H, I), neurons are the last axis. Derived expert d is
    kept expert ``src[d]`` with neurons ``perm[d]`` and signs ``sign[d]`` on the up
    rows / down columns (never on gate rows: SiLU is not odd). ``order`` maps each of
    the E experts to its slot in ``cat([kept, derived])``.
    """

    def __init__(self, base: nn.Parameter, part: str, order, src, perm, sign):
        super().__init__()
        self.base = base
        self.part = part
        self.register_buffer("order", order)
        self.register_buffer("src", src)
        self.register_buffer("perm", perm)
        self.register_buffer("sign", sign)

    def forward(self) -> torch.Tensor:
        base = self.base
        src, perm = self.src.long(), self.perm.long()
        sign = self.sign.to(base.dtype)
        d, inter = perm.shape
        if self.part == "gate_up":
            rows = torch.cat([perm, perm + inter], dim=1)  # (D, 2I)
            sgn = torch.cat([torch.ones_like(sign), sign], dim=1)
            derived = base[src[:, None], rows] * sgn[..., None]
        else:
            picked = base[src]  # (D, H, I)
            derived = torch.gather(picked, 2, perm[:, None, :].expand(d, picked.shape[1], inter)) * sign[:, None, :]
        return torch.cat([base, derived], dim=0)[self.order.long()]


_CLASS_CACHE: dict[tuple[type, tuple[str, ...]], type] = {}


def _derived_class(cls: type, attrs: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``attrs`` are properties computed by ``_ufx_<attr>`` submodules."""
    if getattr(cls, "_ufx_base_cls", None) is not None:
        attrs = tuple(sorted(set(attrs) | set(cls._ufx_attrs)))
        cls = cls._ufx_base_cls
    key = (cls, attrs)
    if key not in _CLASS_CACHE:
        ns: dict[str, Any] = {"_ufx_base_cls": cls, "_ufx_attrs": attrs}
        for a in attrs:
            ns[a] = property(lambda self, _a=a: self._modules["_ufx_" + _a]())
        _CLASS_CACHE[key] = type("Shared" + cls.__name__, (cls,), ns)
    return _CLASS_CACHE[key]


def _swap(module: nn.Module, attr: str, derived: nn.Module) -> None:
    if attr in module._parameters:
        del module._parameters[attr]
    module.add_module("_ufx_" + attr, derived)
    module.__class__ = _derived_class(type(module), (attr,))


def _mark(*tensors: Any) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            setattr(t, SHARED_ATTR, True)


def _owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = pname.rpartition(".")
    return model.get_submodule(mod_name), attr


def _as_perm(p: torch.Tensor) -> torch.Tensor:
    return p.to(torch.int32)


def _as_sign(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.int8)


def apply_sharing(model: nn.Module, report: ShareReport) -> nn.Module:
    """Apply the report's accepted pairs to ``model`` in place and return it.

    Raises ``ValueError`` if the report came from shapes only, or if a weight it
    names is no longer the one it measured (apply the report to the model it
    came from, once). The report's ``total_bytes_saved`` is the predicted drop in
    parameter + buffer bytes.
    """
    if report.mode != "values":
        raise ValueError("apply_sharing needs a report computed on real weights, not from shapes (meta)")
    experts: dict[str, list] = {}
    with torch.no_grad():
        for c in report.accepted:
            p = c.payload
            a, b = p["base"], p["freed"]
            if c.kind == "expert":
                experts.setdefault(b.params[0], []).append((a, b, p))
                continue
            perm = _as_perm(p["perm"]) if "perm" in p else None
            sign = _as_sign(p["sign"]) if "sign" in p else None
            if c.kind == "matrix":
                mod, attr = _owner(model, b.params[0])
                base_mod, base_attr = _owner(model, a.params[0])
                base = base_mod._parameters.get(base_attr)
                if base is None or not isinstance(mod._parameters.get(attr), nn.Parameter):
                    raise ValueError(f"cannot share {b.params[0]} from {a.params[0]}: one of them is not a plain parameter "
                                     "any more (was apply_sharing already called with this report?)")
                blocks = p.get("blocks")
                derived = DerivedMatrix(base, perm=perm, sign=sign if perm is not None else None, blocks=blocks,
                                        left=p.get("left"), right=p.get("right"))
                _swap(mod, attr, derived)
                _mark(base, perm, sign, blocks)
            else:  # ffn: gate, up, down share one neuron permutation; signs on up and down only
                for i, (bp, ap) in enumerate(zip(b.params, a.params)):
                    mod, attr = _owner(model, bp)
                    base_mod, base_attr = _owner(model, ap)
                    base = base_mod._parameters[base_attr]
                    derived = DerivedMatrix(base, perm=perm, sign=sign if (perm is not None and i > 0) else None,
                                            transpose=(i == 2))
                    _swap(mod, attr, derived)
                    _mark(base, perm, sign)
        for gu_name, items in experts.items():
            _apply_experts(model, gu_name, items)
    model._ufx_share_report = report.summary()
    return model


def _apply_experts(model: nn.Module, gu_name: str, items: list) -> None:
    mod, gu_attr = _owner(model, gu_name)
    dn_attr = items[0][1].params[1].rpartition(".")[2]
    gu, dn = mod._parameters[gu_attr], mod._parameters[dn_attr]
    e_count, two_i, _ = gu.shape
    inter = two_i // 2
    derived_ids = sorted(b.expert for _, b, _ in items)
    kept = [e for e in range(e_count) if e not in set(derived_ids)]
    slot = {e: i for i, e in enumerate(kept)}
    by_freed = {b.expert: (a, p) for a, b, p in items}
    src, perms, signs = [], [], []
    for e in derived_ids:
        a, p = by_freed[e]
        src.append(slot[a.expert])
        perms.append(p["perm"] if "perm" in p else torch.arange(inter, device=gu.device))
        signs.append(p["sign"] if "sign" in p else torch.ones(inter, device=gu.device))
    order = torch.empty(e_count, dtype=torch.int32)
    for i, e in enumerate(kept):
        order[e] = i
    for i, e in enumerate(derived_ids):
        order[e] = len(kept) + i
    dev = gu.device
    order = order.to(dev)
    src_t = torch.tensor(src, dtype=torch.int32, device=dev)
    perm_t = _as_perm(torch.stack(perms).to(dev))
    sign_t = _as_sign(torch.stack(signs).to(dev))
    keep_idx = torch.tensor(kept, device=dev)
    new_gu = nn.Parameter(gu.detach()[keep_idx].clone(), requires_grad=gu.requires_grad)
    new_dn = nn.Parameter(dn.detach()[keep_idx].clone(), requires_grad=dn.requires_grad)
    del gu, dn
    _swap(mod, gu_attr, ExpertStack(new_gu, "gate_up", order, src_t, perm_t, sign_t))
    _swap(mod, dn_attr, ExpertStack(new_dn, "down", order, src_t, perm_t, sign_t))
    _mark(new_gu, new_dn, order, src_t, perm_t, sign_t)


def storage_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter and buffer bytes of ``model`` (each storage counted once)."""
    seen: set = set()
    out = {"parameters": 0, "buffers": 0, "numel": 0}
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            key = (t.device, t.data_ptr()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            out[kind] += t.numel() * t.element_size()
            if kind == "parameters":
                out["numel"] += t.numel()
    return out


def is_shared(model: nn.Module) -> bool:
    """True if ``apply_sharing`` has rewritten ``model``."""
    return any(getattr(type(m), "_ufx_base_cls", None) is not None for m in model.modules())
