"""Helpers shared by several test files (imported as ``_support``: pytest puts ``tests/`` on ``sys.path``)."""

import importlib.util
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from unsloth_fx.zoo import build_model


def load_script(path, module_name):
    """Import the script at ``path`` (a benchmark, not part of the package) as module ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def twin_models(name, dtype=torch.float32):
    """Two copies of zoo model ``name`` on CPU with the same weights (seed 0), in training mode, without
    a KV cache: ``(ref, ours)``, the eager reference and the one a test compiles."""
    torch.manual_seed(0)
    ref = build_model(name, device="cpu", dtype=dtype)
    ours = build_model(name, device="cpu", dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    ref.config.use_cache = ours.config.use_cache = False
    ref.train(), ours.train()
    return ref, ours


def loss_and_grads(model, ids):
    """One training step on ``ids`` (labels = ids): the loss and every parameter's gradient, detached fp32
    copies keyed by parameter name. ``model`` may be a ``torch.compile`` wrapper."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    plain = getattr(model, "_orig_mod", model)  # a compiled module wraps the original
    return loss.detach().float(), {n: p.grad.detach().to(torch.float32, copy=True)
                                   for n, p in plain.named_parameters() if p.grad is not None}


class PeakAllocations(TorchDispatchMode):
    """Most bytes of fresh storages alive at once (512-byte blocks), and the shape of every fresh fp32 one."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.fp32_shapes = [], 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                st = o.untyped_storage()
                if st.data_ptr() not in ins and st.nbytes() and all(r() is not st for r, _ in self.live):
                    self.live.append((weakref.ref(st), -(-st.nbytes() // 512) * 512))
                    if o.dtype == torch.float32:
                        self.fp32_shapes.append(tuple(o.shape))
        self.live = [e for e in self.live if e[0]() is not None]
        self.peak = max(self.peak, sum(n for _, n in self.live))
        return out
