from . import adamw  # noqa: F401  registers torch.ops.unsloth_fx.adamw_step_* (HybridAdamW)
from . import linear_cross_entropy  # noqa: F401  registers torch.ops.unsloth_fx.linear_cross_entropy
