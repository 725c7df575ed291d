"""plan_memory reserves CUDA library workspaces (cuBLAS/cuBLASLt) that no graph node allocates."""

import pytest
import torch

import unsloth_fx.backend as backend
from unsloth_fx.memory.schedule import InfeasibleBudget

import unsloth_fx.passes.plan_memory as pm


def _f(w1, w2, x):
    return (torch.relu(x @ w1) @ w2).pow(2).sum()


def _stats(pipeline, budget=None):
    torch._dynamo.reset()
    torch.manual_seed(0)
    w1, w2, x = torch.randn(32, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True), torch.randn(8, 32)
    opts = {"lower": "eager", "pipeline": pipeline}
    if budget is not None:
        opts["memory_budget"] = budget
    torch.compile(_f, backend="unsloth", options=opts)(w1, w2, x).backward()
    return backend.LAST["ctx"].stats["joint"]["plan_memory"]


def test_reserve_adds_exactly_its_bytes_to_the_prediction_and_is_off_on_cpu():
    base = _stats("default")  # CPU: the default reserve is 0
    reserved = _stats("default,plan_memory{workspace_reserve=1048576}")
    assert pm.CUDA_WORKSPACE_RESERVE == 64 * 2**20
    assert reserved["predicted_peak"] - base["predicted_peak"] == 2**20


def test_infeasible_message_names_the_reserve():
    peak = _stats("default")["predicted_peak"]
    with pytest.raises(Exception) as e:  # InfeasibleBudget, possibly wrapped by Dynamo
        _stats("default,plan_memory{workspace_reserve=1048576}", budget=peak + 2**19)
    assert isinstance(e.value, InfeasibleBudget) or "infeasible" in str(e.value)
    assert "CUDA library workspaces 1.00 MiB" in str(e.value)
