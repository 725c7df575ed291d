"""unsloth-fx: a torch.compile backend that fits full-parameter training of
DeepSeek-R1-family models into a memory budget.

    model = torch.compile(model, backend="unsloth", options={"memory_budget": "7GiB"})
"""

from unsloth_fx.options import Options, OptionError
from unsloth_fx.pass_base import PassContext, PassResult, UfxMeta, graph_pass, ufx
from unsloth_fx.pipeline import Pipeline

__version__ = "0.1.0"

__all__ = ["Options", "OptionError", "PassContext", "PassResult", "Pipeline", "UfxMeta", "graph_pass", "ufx"]
