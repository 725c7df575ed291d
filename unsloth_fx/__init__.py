"""unsloth-fx: a torch.compile backend that fits full-parameter training of
DeepSeek-R1-family models into a memory budget.

    model = torch.compile(model, backend="unsloth", options={"memory_budget": "7GiB"})
"""

from unsloth_fx.options import Options, OptionError
from unsloth_fx.pass_base import PassContext, PassResult, UfxMeta, graph_pass, ufx
from unsloth_fx.pipeline import Pipeline

__version__ = "0.1.0"

__all__ = ["apply_optimizations", "Trainer", "Options", "OptionError", "PassContext", "PassResult", "Pipeline", "UfxMeta", "graph_pass", "ufx"]


def __getattr__(name: str):
    # Imported lazily: they pull in the optimizer kernels and transformers.
    if name == "apply_optimizations":
        from unsloth_fx.api import apply_optimizations

        return apply_optimizations
    if name == "Trainer":
        from unsloth_fx.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'unsloth_fx' has no attribute {name!r}")
