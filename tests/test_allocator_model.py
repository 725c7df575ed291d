"""The model of the CUDA caching allocator's block sizes for parameters and optimizer state
(unsloth_fx.memory.allocator), and where the planner counts it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import unsloth_fx.backend as backend
from unsloth_fx.memory import allocator as A
from unsloth_fx.memory import model as M

MiB = 2**20


def test_small_requests_round_to_512_and_share_2mib_segments():
    assert A.blocks([1, 512, 513, 4000]) == [512, 512, 1024, 4096]
    assert A.block_slack([1, 512, 513, 4000] * 100) == 0  # the 512 B rounding is round_block's, not slack


def test_a_large_remainder_of_at_most_1mib_stays_with_the_request():
    # 13 requests of 1.5 MiB from one 20 MiB segment: the 12th leaves 2 MiB (split off), the 13th would leave 0.5 MiB,
    # which is not split off: that request holds a 2 MiB block
    assert A.blocks([3 * MiB // 2] * 13) == [3 * MiB // 2] * 12 + [2 * MiB]
    assert A.block_slack([3 * MiB // 2] * 13) == MiB // 2
    # at 10 MiB and over a request gets a segment of its own, rounded up to 2 MiB, and keeps a remainder <= 1 MiB
    assert A.blocks([10 * MiB + 512]) == [10 * MiB + 512]  # remainder 2 MiB - 512: split off
    assert A.blocks([11 * MiB + 512]) == [12 * MiB]  # remainder 1 MiB - 512: kept


def test_the_mechanism_seen_on_the_1_5b_model():
    # an MLP weight (1536 x 8960 bf16) gets a 28 MiB segment, and its 1.75 MiB remainder is split off; the int4
    # codes of a 1536 x 1536 weight (1,179,648 B) later take that remainder whole: 640 KiB each over
    mlp, codes = 1536 * 8960 * 2, 1536 * 1536 // 2
    assert A.blocks([mlp, codes]) == [mlp, 1_835_008]
    assert A.block_slack([mlp] * 3 + [codes] * 3) == 3 * (1_835_008 - codes)


def test_the_arena_removes_the_1_5b_state_slack():
    from unsloth_fx.zoo import build_model

    m = build_model("r1-distill-qwen-1.5b", device="meta", dtype=torch.bfloat16)
    rows = [(p.numel(), p.dtype, True, False, n, tuple(p.shape)) for n, p in m.named_parameters()]
    per_tensor = M.static_breakdown(rows, M.StatePolicy("int4", "int4", state_arena=False), True)
    arena = M.static_breakdown(rows, M.StatePolicy("int4", "int4"), True)
    assert per_tensor.optimizer_state == arena.optimizer_state  # the same state bytes, allocated differently
    assert len(per_tensor.resident_requests) > 6 * len(rows)  # int4: 4 state tensors + 2 counters; fp32: 2 + 2
    assert len(arena.resident_requests) == len(rows) + 2  # int4 codes (uint8) and scales + counters (fp32)
    # per-tensor: 87 MiB of blocks beyond the tensors (the H100 measured 87.8 MiB over the plan, docs/memory.md);
    # one arena: the parameters' own 1.75 MiB (embedding and LM head) and the arena's rounding
    assert 80 * MiB < A.block_slack(per_tensor.resident_requests) < 95 * MiB
    assert A.block_slack(arena.resident_requests) < 4 * MiB


def test_the_model_counts_the_buffers_the_arena_allocates():
    from unsloth_fx.optim import HybridAdamW
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    m = build_model("tiny-qwen2", device="cpu", dtype=torch.bfloat16)
    named = list(m.named_parameters())
    rows = [(p.numel(), p.dtype, True, False, n, tuple(p.shape)) for n, p in named]
    for tiers in (("int4", "int4"), ("hybrid", "fp32"), ("int8", "bf16")):
        opt = HybridAdamW([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}],
                          state_precision=tiers[0], high_precision_tier=tiers[1], min_quant_numel=64)
        planned = opt.state_arena_sizes()  # before the state exists: what the first step will allocate
        policy = M.StatePolicy(tiers[0], tiers[1], min_quant_numel=64)
        assert M.static_breakdown(rows, policy, True).resident_requests[len(rows):] == planned
        assert M.static_breakdown(rows, opt, True).resident_requests[len(rows):] == planned
        opt.init_state()  # allocates as the first step would, without stepping
        held = sorted({id(t.untyped_storage()): t.untyped_storage().nbytes() for st in opt.state.values()
                       for t in st.values() if isinstance(t, torch.Tensor)}.values())
        assert held == sorted(planned) and opt.state_arena_sizes() == planned and sum(planned) == opt.state_arena_bytes()
        assert all(float(st["step"]) == 0 for st in opt.state.values())


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 768, bias=False) for _ in range(13))  # 1.5 MiB fp32

    def forward(self, x):
        return sum(layer(x).sum() for layer in self.layers)


def _plan_stats(pipeline):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _Stack()
    torch.compile(m, backend="unsloth", options={"lower": "eager", "pipeline": pipeline})(torch.randn(2, 512)).backward()
    return backend.LAST["ctx"].stats["joint"]["plan_memory"]


def test_plan_memory_counts_the_slack_on_cuda_only_and_exactly():
    base = _plan_stats("default,plan_memory{optimizer=sgd}")  # on a CPU "auto" counts none
    cuda = _plan_stats("default,plan_memory{optimizer=sgd,allocator=cuda}")
    none = _plan_stats("default,plan_memory{optimizer=sgd,allocator=none}")
    assert base["block_slack"] == none["block_slack"] == 0
    assert cuda["block_slack"] == MiB // 2  # the 13th weight's block, as in the rule test above
    assert cuda["predicted_peak"] - base["predicted_peak"] == MiB // 2 == base["predicted_peak"] - none["predicted_peak"] + MiB // 2


def test_plan_memory_refuses_an_unknown_allocator_model():
    with pytest.raises(Exception, match="allocator='tlsf'"):
        _plan_stats("default,plan_memory{allocator=tlsf}")


@pytest.mark.parametrize("conf,default", [("", True), ("expandable_segments:True", False),
                                          ("expandable_segments:False", True), ("max_split_size_mb:128", False),
                                          ("roundup_power2_divisions:4", False)])
def test_default_settings_reads_the_alloc_conf(monkeypatch, conf, default):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert A.default_settings() is default


@pytest.mark.cuda
def test_the_model_matches_the_cuda_caching_allocator():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sizes = ([1536 * 8960 * 2] * 3 + [1536 * 1536 // 2] * 5 + [1536 * 8960 // 2] * 7 + [430_080] * 9 + [3 * MiB // 2] * 13
             + [151936 * 1536 * 2] + [4] * 20 + [11 * MiB + 512] * 2)
    code = textwrap.dedent(f"""
        import torch
        sizes = {sizes!r}
        torch.cuda.init()
        before = torch.cuda.memory_allocated()
        keep = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
        print(torch.cuda.memory_allocated() - before)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout.split()[-1]) == sum(A.blocks(sizes)), (out.stdout, sum(A.blocks(sizes)))


def test_resident_slack_script_counts_the_tensors_it_allocates(monkeypatch):
    # benchmarks/resident_slack.py on a CPU, its CUDA counters faked: the bytes it calls the tensors' own are the
    # model's static bytes, and with the arena the state's buffers are the ones the optimizer holds
    import importlib.util

    import unsloth_fx.zoo as zoo

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "resident_slack.py")
    spec = importlib.util.spec_from_file_location("resident_slack", path)
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    real = zoo.build_model
    monkeypatch.setattr(zoo, "build_model", lambda name, device, dtype: real("tiny-qwen2", device="cpu", dtype=dtype))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu")
    arena, per_tensor = rs.measure("x", "int4/int4", True), rs.measure("x", "int4/int4", False)
    params = sum(p.numel() * 2 for p in real("tiny-qwen2", device="meta", dtype=torch.bfloat16).parameters())
    assert arena["own_bytes"] == per_tensor["own_bytes"] > params + arena["state_bytes"]  # + counters, 512 B blocks
    assert arena["arena_bytes"] >= arena["state_bytes"] > 0 and per_tensor["arena_bytes"] == 0
