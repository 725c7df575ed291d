"""The model zoo: published sizes on meta, tiny models train on CPU, eager and under Dynamo."""

import copy
import math

import pytest
import torch

from unsloth_fx import zoo

TINY = ["tiny-qwen2", "tiny-llama", "tiny-deepseek-v3"]

# name -> (published total, relative tolerance)
PUBLISHED = {
    "r1-distill-qwen-1.5b": (1_777_088_000, 1e-3),
    "r1-distill-qwen-7b": (7.62e9, 1e-3),
    "r1-distill-qwen-14b": (14.77e9, 1e-3),
    "r1-distill-qwen-32b": (32.76e9, 1e-3),
    "r1-distill-llama-8b": (8.03e9, 1e-3),
    "r1-distill-llama-70b": (70.55e9, 1e-3),
    "deepseek-r1": (671e9, 5e-3),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published_total_on_meta(name):
    model = zoo.build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = zoo.count_parameters(model)
    published, rtol = PUBLISHED[name]
    assert abs(n - published) / published < rtol, f"{name}: {n:,} vs published {published:,.0f}"
    assert n == zoo.count_parameters(name)


def test_qwen_1_5b_count_by_formula():
    # Untied embeddings: embed + lm_head, q/k/v with bias, o without, SwiGLU MLP, two norms
    # per layer plus the final norm.
    v, h, i, layers, heads, kv = 151936, 1536, 8960, 28, 12, 2
    kv_dim = h // heads * kv
    attn = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h
    per_layer = attn + 3 * h * i + 2 * h
    expected = 2 * v * h + layers * per_layer + h
    assert expected == 1_777_088_000
    assert zoo.count_parameters("r1-distill-qwen-1.5b") == expected


def test_deepseek_r1_is_the_v3_architecture():
    c = zoo.get_config("deepseek-r1")
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (7168, 61, 3)
    assert (c.intermediate_size, c.moe_intermediate_size) == (18432, 2048)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (256, 1, 8)
    assert (c.n_group, c.topk_group, c.num_attention_heads, c.vocab_size) == (8, 4, 128, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    model = zoo.build_model("deepseek-r1")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert 0.95 < experts / zoo.count_parameters(model) < 0.99  # routed experts are ~96%


def test_deepseek_v3_mini_fits_one_gpu_with_full_adamw():
    model = zoo.build_model("deepseek-v3-mini")
    n = zoo.count_parameters(model)
    assert 1.0e9 <= n <= 2.0e9
    assert 16 * n < 40e9  # fp32 weights + grads + 2 Adam moments leave room for activations in 80 GB
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == "DeepseekV3MLP"
    assert all(type(l.mlp).__name__ == "DeepseekV3MoE" for l in layers[1:])


def test_dtype_and_overrides():
    model = zoo.build_model("r1-distill-llama-8b", dtype="bfloat16", num_hidden_layers=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.model.layers) == 2
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False  # else packed position_ids are ignored (see test_data)
    assert zoo.get_config("tiny-qwen2", use_cache=True).use_cache is True
    assert model.config.rope_parameters["rope_type"] == "llama3"
    # The MoE router pins float32 parameters; dtype= must still make the whole model uniform.
    moe = zoo.build_model("tiny-deepseek-v3", dtype=torch.bfloat16)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}


def test_bad_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'r1-distill-qwen-3b'") as e:
        zoo.build_model("r1-distill-qwen-3b")
    for name in zoo.list_models():
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid names"):
        zoo.get_config("nope")


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_forward_backward_on_cpu(name):
    torch.manual_seed(0)
    model = zoo.build_model(name, device="cpu")
    assert zoo.count_parameters(model) < 300_000
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512
    ids = torch.randint(0, 512, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(512)) < 0.5  # random init predicts ~uniformly
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_tiny_deepseek_v3_has_mla_dense_and_moe_layers():
    model = zoo.build_model("tiny-deepseek-v3", device="meta")
    attn = model.model.layers[0].self_attn
    assert attn.q_a_proj is not None and attn.kv_a_proj_with_mqa is not None  # MLA low-rank paths
    assert type(model.model.layers[0].mlp).__name__ == "DeepseekV3MLP"
    assert type(model.model.layers[1].mlp).__name__ == "DeepseekV3MoE"
    assert model.config._experts_implementation == "grouped_mm"


def _train(model, ids, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_trains_identically_under_dynamo(name):
    torch.manual_seed(0)
    eager = zoo.build_model(name, device="cpu")
    compiled_copy = copy.deepcopy(eager)
    ids = torch.randint(0, 512, (2, 16))
    torch._dynamo.reset()
    # fullgraph=True: any graph break (e.g. the eager MoE loop over experts) fails the test.
    compiled = torch.compile(compiled_copy, backend="eager", fullgraph=True)
    ref = _train(eager, ids)
    got = _train(compiled, ids)
    assert ref[-1] < ref[0]  # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = zoo.build_model("tiny-deepseek-v3", device="cpu")
    model.save_pretrained(tmp_path)
    loaded = zoo.from_pretrained(tmp_path, device="cpu")
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "sdpa"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(FileNotFoundError, match="never downloads"):
        zoo.from_pretrained(tmp_path / "missing")
