from . import adamw  # noqa: F401  registers torch.ops.unsloth_fx.adamw_step_* (HybridAdamW)
