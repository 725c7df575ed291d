"""Built-in graph passes (installed as ``unsloth_fx.passes``). Importing this
package registers them."""

from unsloth_fx.passes import chunk_recompute, fuse_optimizer, plan_memory, share_weights  # noqa: F401
from unsloth_fx.passes import fuse_linear_cross_entropy  # noqa: F401
from unsloth_fx.passes import split_token_chunks  # noqa: F401
from unsloth_fx.passes import offload_activations, reload_activations  # noqa: F401
from unsloth_fx.passes import inplace_saved_grad_scale  # noqa: F401
