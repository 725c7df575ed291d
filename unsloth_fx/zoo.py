"""The DeepSeek-R1 model family as transformers configs: build on meta, CPU or CUDA, no download.

Every entry of :data:`MODELS` records the published architecture (the fields of the
checkpoint's ``config.json`` that change the shapes or the numerics), the published
parameter count, and where the numbers come from. Models are built with random
weights; :func:`from_pretrained` loads a checkpoint that is already on local disk.

Only config fields and classes present in transformers 5.17 (the GPU machine) and
later are used: ``Qwen2Config``, ``LlamaConfig``, ``DeepseekV3Config`` and their
``*ForCausalLM`` classes.

MoE experts. transformers' ``DeepseekV3Experts`` takes an ``experts_implementation``:

* ``"eager"`` loops over the experts that received tokens (``nonzero`` plus a Python
  loop over a data-dependent tensor): Dynamo graph-breaks there, so it is never our
  default.
* ``"grouped_mm"`` (transformers' default, and ours): sort by expert, one grouped GEMM
  per projection. Under Dynamo with a dtype other than bf16 transformers routes it
  through its opaque custom op ``torch.ops.transformers.grouped_mm_fallback`` (it has
  fake and autograd kernels, so the graph is whole, but the op is a black box to our
  passes). In bf16 it is ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``.
* ``"batched_mm"``: gathers each token's expert weights and runs ``bmm``; made of plain
  aten ops only (every op visible to the passes), but it materializes
  ``tokens * top_k`` copies of the expert weights, so it suits tiny models only.

Pass ``experts_implementation=...`` to :func:`build_model` to choose.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "from_pretrained",
    "get_config",
    "list_models",
]


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry: the transformers family, its config kwargs and the published size."""

    family: str  # "qwen2" | "llama" | "deepseek_v3"
    config: dict[str, Any]
    published_params: int | None  # parameters as published (None: our own design)
    source: str
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


# The DeepSeek-R1-Distill checkpoints keep their base model's shapes; the fields below
# are the ones in each distill checkpoint's config.json that matter for shapes and numerics.
_QWEN_LONG = {"max_position_embeddings": 131072, "sliding_window": 4096, "max_window_layers": 21}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

MODELS: dict[str, ModelSpec] = {
    "r1-distill-qwen-1.5b": ModelSpec(
        family="qwen2",
        config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643, **_QWEN_LONG,
        ),
        published_params=1_777_088_000,
        source="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json (base Qwen2.5-Math-1.5B); 1.78B",
        notes="embeddings untied in the distill checkpoint, unlike Qwen2.5-1.5B (1.54B, tied)",
    ),
    "r1-distill-qwen-7b": ModelSpec(
        family="qwen2",
        config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643, **_QWEN_LONG,
        ),
        published_params=7_615_616_512,
        source="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json (base Qwen2.5-Math-7B); 7.62B",
    ),
    "r1-distill-qwen-14b": ModelSpec(
        family="qwen2",
        config=dict(
            vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
            num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643, **_QWEN_LONG,
        ),
        published_params=14_770_033_664,
        source="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B config.json (base Qwen2.5-14B); 14.77B",
    ),
    "r1-distill-qwen-32b": ModelSpec(
        family="qwen2",
        config=dict(
            vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
            num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643, **_QWEN_LONG,
        ),
        published_params=32_763_876_352,
        source="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B config.json (base Qwen2.5-32B); 32.76B",
    ),
    "r1-distill-llama-8b": ModelSpec(
        family="llama",
        config=dict(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
            max_position_embeddings=131072, rope_parameters=dict(_LLAMA3_ROPE),
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        ),
        published_params=8_030_261_248,
        source="deepseek-ai/DeepSeek-R1-Distill-Llama-8B config.json (base Llama-3.1-8B); 8.03B",
    ),
    "r1-distill-llama-70b": ModelSpec(
        family="llama",
        config=dict(
            vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
            max_position_embeddings=131072, rope_parameters=dict(_LLAMA3_ROPE),
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        ),
        published_params=70_553_706_496,
        source="deepseek-ai/DeepSeek-R1-Distill-Llama-70B config.json (base Llama-3.3-70B-Instruct); 70.55B",
    ),
    "deepseek-r1": ModelSpec(
        family="deepseek_v3",
        config=dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
            num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
            num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
            norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-6,
            max_position_embeddings=163840,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
            },
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        ),
        published_params=671_000_000_000,
        source="deepseek-ai/DeepSeek-R1 config.json (DeepSeek-V3 architecture); 671B main model",
        notes="the checkpoint's 685B includes the 14B multi-token-prediction module, not built here",
    ),
    # Our own design: the DeepSeek-V3 block (MLA + grouped-routing MoE with a shared expert,
    # leading dense layer, sigmoid router with bias correction) at ~1.4B parameters, so that
    # full-parameter AdamW (fp32 weights, grads and two moments: 16 B/param = 22.7 GB) plus
    # activations fits one 80 GB GPU. Shapes:
    # - vocab 129280: DeepSeek's own tokenizer, so LM-head/embedding memory behaves as in R1.
    # - hidden 1024, 12 layers, first 1 dense (intermediate 4096 = 4x hidden).
    # - 64 routed experts of 512 (1/2 hidden, V3's ratio is 2048/7168 ~ 0.29) + 1 shared,
    #   6 per token, n_group 8 / topk_group 4 as in V3: experts are 78% of the parameters
    #   (V3: 97%), enough for the sharing and chunking passes to matter.
    # - MLA with V3's proportions: 16 heads, q_lora 384, kv_lora 256, qk_nope 64,
    #   qk_rope 32, v_head 64.
    # - yarn rope as in R1 (factor 4 over 4096 original positions).
    "deepseek-v3-mini": ModelSpec(
        family="deepseek_v3",
        config=dict(
            vocab_size=129280, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
            num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16,
            num_key_value_heads=16, n_shared_experts=1, n_routed_experts=64,
            num_experts_per_tok=6, n_group=8, topk_group=4, routed_scaling_factor=2.5,
            norm_topk_prob=True, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, rms_norm_eps=1e-6,
            max_position_embeddings=16384,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
            },
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        ),
        published_params=None,
        source="unsloth-fx design (see comment above the entry)",
        notes="~1.44B total, ~0.39B active per token",
    ),
    # Tiny test models: 2 layers, vocab 512, fast forward+backward on CPU.
    "tiny-qwen2": ModelSpec(
        family="qwen2",
        config=dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        published_params=None,
        source="test model with Qwen2 (R1-Distill-Qwen) structure: q/k/v bias, GQA",
        tags=("tiny",),
    ),
    "tiny-llama": ModelSpec(
        family="llama",
        config=dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=2048,
            rope_parameters={**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
            tie_word_embeddings=False,
        ),
        published_params=None,
        source="test model with Llama-3 (R1-Distill-Llama) structure: GQA, llama3 rope scaling",
        tags=("tiny",),
    ),
    "tiny-deepseek-v3": ModelSpec(
        family="deepseek_v3",
        config=dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 512,
            },
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        ),
        published_params=None,
        source="test model with the DeepSeek-V3 block: MLA (q/kv LoRA, yarn rope), layer 0 dense, layer 1 MoE",
        tags=("tiny",),
    ),
}

_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}

# Keyword arguments that select an implementation rather than describe the architecture.
_IMPL_KEYS = ("attn_implementation", "experts_implementation")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, in table order."""
    return list(MODELS)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(MODELS)}"
        ) from None


def _classes(family: str):
    import transformers

    cfg_name, model_name = _FAMILIES[family]
    return getattr(transformers, cfg_name), getattr(transformers, model_name)


def get_config(name: str, **overrides: Any):
    """The transformers config of ``name`` with ``overrides`` applied (e.g. ``num_hidden_layers=2``).

    ``use_cache`` defaults to False (pass ``use_cache=True`` for generation).
    ``attn_implementation`` defaults to ``"sdpa"``; MoE models default to
    ``experts_implementation="grouped_mm"`` (see the module docstring).
    """
    spec = _spec(name)
    cfg_cls, _ = _classes(spec.family)
    kwargs = copy.deepcopy(spec.config)
    # A training zoo: with use_cache=True transformers builds a KV cache even in training
    # and then skips packed-sequence detection from position_ids, silently letting
    # attention cross example boundaries in packed batches (see unsloth_fx.data).
    kwargs["use_cache"] = False
    impl = {k: overrides.pop(k) for k in _IMPL_KEYS if k in overrides}
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    config._attn_implementation = impl.get("attn_implementation", "sdpa")
    if spec.family == "deepseek_v3":
        config._experts_implementation = impl.get("experts_implementation", "grouped_mm")
    elif "experts_implementation" in impl:
        raise ValueError(f"experts_implementation applies to MoE models only, not {name!r}")
    return config


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        got = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(got, torch.dtype):
            return got
    raise ValueError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")


def _build_from_config(config, model_cls, device, dtype):
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    # Build directly on the target device so a 671B model on meta costs nothing and a
    # CUDA model never makes a CPU copy. The default dtype is set only while building.
    old_dtype = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with device:
            model = model_cls(config)
    finally:
        torch.set_default_dtype(old_dtype)
    if dtype is not None:
        # Keep dtypes uniform: some modules (e.g. the MoE router) pin float32 parameters.
        model.to(dtype)
        config.dtype = dtype
    return model


def build_model(name: str, device: str | torch.device = "meta", dtype=None, **config_overrides: Any):
    """Build ``name`` with random weights on ``device`` ("meta", "cpu", "cuda", ...).

    ``dtype`` (a ``torch.dtype`` or its name) sets the parameter dtype; None keeps
    float32. ``config_overrides`` go to the config (see :func:`get_config`). On meta
    nothing is allocated, so even ``deepseek-r1`` (671B) builds in seconds.
    """
    spec = _spec(name)
    config = get_config(name, **config_overrides)
    _, model_cls = _classes(spec.family)
    return _build_from_config(config, model_cls, device, dtype)


def count_parameters(model_or_name, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of a model or zoo name; works on meta, shared tensors counted once."""
    if isinstance(model_or_name, str):
        model_or_name = build_model(model_or_name, device="meta")
    seen: set[int] = set()
    total = 0
    for p in model_or_name.parameters():  # parameters() already de-duplicates tied weights
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None, **kwargs: Any):
    """Load a local checkpoint directory (``config.json`` + weights); never downloads.

    ``attn_implementation`` defaults to ``"sdpa"``; other ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} is not a local checkpoint directory (no config.json); "
            "unsloth-fx never downloads weights: save one with model.save_pretrained(path)"
        )
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs.setdefault("local_files_only", True)
    dtype = _resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **kwargs)
    return model.to(torch.device(device))
