"""unsloth-fx under FSDP2, on CPU with gloo and 2 processes (see docs/distributed.md).

One ``torch.distributed.run`` launch (2 ranks) runs every distributed scenario of
this file (``_worker``) and writes one JSON per rank; the tests read it.  The
single-process references are computed here, in the test process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

from unsloth_fx.distributed import (
    ParamCounts, check_sharing_groups, decoder_blocks, gpus_needed, merge_sharing_groups,
    optimizer_bytes_per_param, shard_blocks_align, sharded_static_bytes,
)

WORLD = 2
STEPS = 3
GLOBAL_BATCH = (4, 16)  # (sequences, tokens): each rank gets 2 sequences
LR = 1e-3
# (name, units, optimizer): FSDP2 per decoder block + root, and root only
TRAIN_CONFIGS = [("blocks+root", "blocks", "adamw"), ("blocks+root", "blocks", "hybrid-fp32"),
                 ("root", "root", "adamw")]
# (shape, tier): shard_blocks_align(shape, 2) is True for all but (6, 100) and (10, 50)
OPTIM_SHAPES = [(256, 64), (3, 128), (1, 256), (6, 100), (10, 50)]
OPTIM_TIERS = ["fp32", "int8", "int4"]


def _batch() -> torch.Tensor:
    return torch.randint(0, 512, GLOBAL_BATCH, generator=torch.Generator().manual_seed(1))


def _make_optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR)
    from unsloth_fx.optim import HybridAdamW

    return HybridAdamW(params, lr=LR, state_precision=kind.split("-")[1])


def _optim_data(shape, tier):
    g = torch.Generator().manual_seed(31 * sum(shape) + OPTIM_TIERS.index(tier))
    w = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * 10 ** (-k) for k in range(STEPS)]
    return w, grads


def _optim_single(shape, tier):
    from unsloth_fx.optim import HybridAdamW

    w, grads = _optim_data(shape, tier)
    p = nn.Parameter(w.clone())
    opt = HybridAdamW([p], lr=1e-2, state_precision=tier, quantize_all=True)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    return p.detach()


# -- the 2-rank worker ----------------------------------------------------------------------------

def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import unsloth_fx.backend as ufx_backend
    from unsloth_fx.distributed import (
        load_optimizer_state_dict, optimizer_state_dict, optimizer_state_template, shard_model,
    )
    from unsloth_fx.optim import HybridAdamW
    from unsloth_fx.zoo import build_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,))
    res: dict = {"train": {}, "optim": {}}

    # 1. FSDP2 + torch.compile(backend="unsloth"): losses on the global batch
    ids = _batch().chunk(WORLD)[rank]
    for name, units, kind in TRAIN_CONFIGS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model("tiny-qwen2", device="cpu", dtype=torch.float32, use_cache=False)
        shard_model(model, None if units == "blocks" else [""], mesh=mesh)
        compiled = torch.compile(model, backend="unsloth", options={"lower": "eager"})
        opt = _make_optimizer(kind, model.parameters())
        g0 = next(ufx_backend._graph_ids)
        losses = []
        for _ in range(STEPS):
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / WORLD)
        res["train"][f"{name}/{kind}"] = {
            "losses": losses, "graphs": next(ufx_backend._graph_ids) - g0 - 1,
            "had_backward": ufx_backend.LAST.get("backward") is not None,
            "dtensor_params": all(hasattr(p, "device_mesh") for p in model.parameters()),
        }

    # 2. HybridAdamW on DTensor parameters vs the full tensor
    for shape in OPTIM_SHAPES:
        for tier in OPTIM_TIERS:
            w, grads = _optim_data(shape, tier)
            p = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
            opt = HybridAdamW([p], lr=1e-2, state_precision=tier, quantize_all=True)
            for gr in grads:
                p.grad = distribute_tensor(gr.clone(), mesh, [Shard(0)])
                opt.step()
            full = p.full_tensor()
            ref = _optim_single(shape, tier)
            res["optim"][f"{shape}/{tier}"] = {
                "max_abs_diff": float((full.detach() - ref).abs().max()),
                "max_update": float((ref - w).abs().max()),
                "local_numel": p.to_local().numel(),
            }

    # 3. a non-finite gradient on one rank's shard makes every rank skip
    w = torch.randn(8, 16)
    p = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    opt = HybridAdamW([p], lr=1e-2, state_precision="fp32")
    gr = torch.randn(8, 16)
    gr[7, 3] = float("inf")  # rows 4..7 live on rank 1 only
    p.grad = distribute_tensor(gr, mesh, [Shard(0)])
    opt.step()
    res["nonfinite"] = {"unchanged": bool(torch.equal(p.full_tensor(), w)),
                        "skips": opt.nonfinite_skips(), "step": float(opt.state[p]["step"])}

    # 4. HybridAdamW state through torch.distributed.checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # 64*128: int8 blocks align
    shard_model(model, ["0", "2", ""], mesh=mesh)

    def make_opt():
        return HybridAdamW([{"params": [model[0].weight, model[2].weight], "state_precision": "int8",
                             "min_quant_numel": 1},
                            {"params": [model[0].bias, model[2].bias], "state_precision": "fp32"}], lr=1e-2)

    def step(opt, seed):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed * 10 + rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    opt_a = make_opt()
    for s in range(2):
        step(opt_a, s)
    ckpt = os.path.join(out_dir, "ckpt")
    dcp.save({"optim": optimizer_state_dict(opt_a, model)}, checkpoint_id=ckpt)
    saved = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    step(opt_a, 2)
    after_a = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.to_local().copy_(saved[k])
    opt_b = make_opt()
    holder = {"optim": optimizer_state_template(opt_b, model)}
    dcp.load(holder, checkpoint_id=ckpt)
    load_optimizer_state_dict(opt_b, holder["optim"], model)
    tiers_b = sorted(st["tier"] for st in opt_b.state.values())
    step(opt_b, 2)
    after_b = {k: v.to_local() for k, v in model.state_dict().items()}
    res["dcp"] = {"tiers": tiers_b,
                  "max_abs_diff": max(float((after_a[k] - after_b[k]).abs().max()) for k in after_a),
                  "moved": max(float((after_a[k] - saved[k]).abs().max()) for k in after_a),
                  "state_equal": all(torch.equal(a, b) for sa, sb in zip(opt_a.state.values(), opt_b.state.values())
                                     for a, b in ((sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor)))}

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run the worker on 2 gloo ranks once; the per-rank JSON results."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH":
               os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               __file__, "--worker", d]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, f"2-rank worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        out = []
        for r in range(WORLD):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


def _single_process_losses(kind: str) -> list[float]:
    from unsloth_fx.zoo import build_model

    torch.manual_seed(0)
    model = build_model("tiny-qwen2", device="cpu", dtype=torch.float32, use_cache=False)
    opt = _make_optimizer(kind, model.parameters())
    ids = _batch()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


# -- FSDP2 + backend="unsloth" ---------------------------------------------------------------------

@pytest.mark.parametrize("name,units,kind", TRAIN_CONFIGS)
def test_fsdp2_compiled_training_matches_single_process(ranks, name, units, kind):
    """Losses of FSDP2 (2 ranks, 2 sequences each) compiled with the unsloth backend
    equal single-process eager training on the same 4 sequences, to fp32 tolerance."""
    got = ranks[0]["train"][f"{name}/{kind}"]
    assert got == ranks[1]["train"][f"{name}/{kind}"]
    assert got["dtensor_params"], "fully_shard did not turn the parameters into DTensors"
    assert got["graphs"] >= 1 and got["had_backward"], "the unsloth backend compiled no training graph"
    ref = _single_process_losses(kind)
    assert ref[-1] < ref[0] - 0.1  # training moves: a broken update would show
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref), rtol=1e-5, atol=1e-5)


# -- HybridAdamW on DTensor parameters -----------------------------------------------------------

@pytest.mark.parametrize("tier", OPTIM_TIERS)
@pytest.mark.parametrize("shape", OPTIM_SHAPES, ids=str)
def test_hybrid_adamw_sharded_update_equals_full(ranks, shape, tier):
    """fp32: any shard equals the full update bitwise.  Quantized tiers: bitwise
    where shard_blocks_align; elsewhere blocks are cut differently, so only within
    the tier's tolerance (relative to the update size)."""
    got = ranks[0]["optim"][f"{tuple(shape)}/{tier}"]
    assert got["max_abs_diff"] == ranks[1]["optim"][f"{tuple(shape)}/{tier}"]["max_abs_diff"]
    assert got["max_update"] > 1e-3  # the optimizer did move the weights
    if tier == "fp32" or shard_blocks_align(shape, WORLD):
        assert got["max_abs_diff"] == 0.0, got
    else:
        tol = {"int8": 0.05, "int4": 0.35}[tier]
        assert got["max_abs_diff"] <= tol * got["max_update"], got
    if shape == (1, 256):
        assert ranks[1]["optim"][f"{tuple(shape)}/{tier}"]["local_numel"] == 0  # the empty-shard rank ran too


def test_nonfinite_gradient_on_one_shard_skips_all_ranks(ranks):
    for r in ranks:
        assert r["nonfinite"] == {"unchanged": True, "skips": 1, "step": 0.0}


def test_hybrid_adamw_state_round_trips_through_dcp(ranks):
    """Save after 2 steps, step on; restore weights, load into a fresh optimizer,
    step: bitwise the same weights and state on both ranks."""
    for r in ranks:
        d = r["dcp"]
        assert d["tiers"] == ["fp32", "fp32", "int8", "int8"]
        assert d["moved"] > 0
        assert d["max_abs_diff"] == 0.0 and d["state_equal"], d


# -- alignment rule, accounting, sharing checks (no processes) -------------------------------------

@pytest.mark.parametrize("shape,world,expected", [
    ((256, 64), 2, True),     # 128 rows * 64 = 8192 = 64 blocks per shard
    ((6, 100), 2, False),     # 3 rows * 100 = 300: rank 1 starts mid-block
    ((3, 128), 2, True),      # 2 rows * 128; rank 1 holds 1 row
    ((7, 64), 4, True),       # 2 rows * 64 = 128
    ((7, 64), 8, False),      # 1 row * 64
    ((1000,), 3, False),      # 334 elements
    ((1000,), 1, True),
])
def test_shard_blocks_align_rule(shape, world, expected):
    assert shard_blocks_align(shape, world) is expected


def test_optimizer_bytes_per_param_matches_the_tier_layout():
    assert optimizer_bytes_per_param("fp32") == 8
    assert optimizer_bytes_per_param("bf16") == 4
    assert optimizer_bytes_per_param("int8") == 2 + 8 / 128   # two 1-byte codes + two fp32 scales per block
    assert optimizer_bytes_per_param("int4") == 1 + 8 / 128
    # int4 codes + scales + slot/err (int32 + fp32 per block) + fp32 pool for 10% of blocks
    assert optimizer_bytes_per_param("hybrid") == 1 + 16 / 128 + int(0.1 * 1024) * 8 / 1024  # 2^17 / 128 blocks


def test_sharded_static_bytes_by_hand():
    """1000 params: 100 with fp32 moments, units of 300 and 400, root 300; 4 ranks, int8."""
    c = {"total": 1000, "fp32_state": 100, "units": [300, 400], "root": 300}
    b = sharded_static_bytes(c, 4, "int8")
    assert b.params == 250 * 2 and b.grads == 250 * 2  # bf16, ceil(1000 / 4)
    assert b.optimizer_state == math.ceil(225 * 2.0625) + 25 * 8
    # root params + grads unsharded (bf16) + 2 gathered copies of the largest unit + its grads
    assert b.gather_buffers == 300 * 4 + 400 * (2 * 2 + 2)
    assert b.total == 500 + 500 + 465 + 200 + 1200 + 2400
    amp = sharded_static_bytes(c, 4, "amp-fp32")  # fp32 shards, bf16 gather, fp32 reduce
    assert (amp.params, amp.grads, amp.optimizer_state) == (1000, 1000, 250 * 8)
    assert amp.gather_buffers == 300 * 6 + 400 * (2 * 2 + 4)
    one = sharded_static_bytes(c, 1, "fp32")
    assert one.gather_buffers == 0 and one.total == 1000 * (2 + 2 + 8)


def test_gpus_needed_is_the_smallest_fitting_world_size():
    c = ParamCounts(total=10**6, fp32_state=0, units={f"u{i}": 10**4 for i in range(100)}, root=0)
    budget = 1_000_000
    w = gpus_needed(c, "fp32", budget)
    assert sharded_static_bytes(c, w, "fp32").total <= budget < sharded_static_bytes(c, w - 1, "fp32").total
    assert gpus_needed(c, "fp32", 10**4 * 6 - 1) is None  # gather buffers alone exceed the budget
    assert gpus_needed(c, "fp32", 12 * 10**6) == 1


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 8, bias=False)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 8, bias=False)


def test_check_sharing_groups_refuses_a_split_pair():
    m = _Toy()
    assert decoder_blocks(m) == ["layers.0", "layers.1", "layers.2"]
    check_sharing_groups(m, decoder_blocks(m) + [""])  # nothing shared yet
    m.layers[2].derived = nn.Module()
    m.layers[2].derived.base = m.layers[0].up.weight  # what apply_sharing does: the kept Parameter, registered again
    with pytest.raises(ValueError, match=r"'layers\.0\.up\.weight' belongs to unit 'layers\.0' but "
                                         r"'layers\.2\.derived\.base' belongs to unit 'layers\.2'.*"
                                         r"common parent 'layers'"):
        check_sharing_groups(m, decoder_blocks(m) + [""])
    check_sharing_groups(m, ["layers.1", ""])  # both names fall to the root: allowed
    assert merge_sharing_groups(m, decoder_blocks(m) + [""]) == ["layers.1", ""]


def test_check_sharing_groups_sees_tied_embeddings_and_unknown_units():
    m = _Toy()
    m.layers[1].up.weight = m.head.weight  # tied: layer 1 and the root share one tensor
    with pytest.raises(ValueError, match="head.weight"):
        check_sharing_groups(m, ["layers.1", ""])
    check_sharing_groups(m, ["layers.0", ""])
    with pytest.raises(ValueError, match="not modules"):
        check_sharing_groups(m, ["layers.9"])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
