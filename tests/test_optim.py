"""HybridAdamW as a torch.optim.Optimizer: parity with torch.optim.AdamW,
state dict, bad input, the gate, schedulers and bytes per parameter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import io  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from unsloth_fx.optim import HybridAdamW, param_groups  # noqa: E402
from unsloth_fx.runtime import adamw as K  # noqa: E402


def _pair(shape=(48, 64), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen).to(dtype)
    return w0, torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())


def _grads(shape, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * 0.1 for _ in range(steps)]


# --------------------------------------------------------------------------
# parity with torch.optim.AdamW
# --------------------------------------------------------------------------

# tolerance on the 20-step weight difference, relative to the distance moved
TOL = {"fp32": 1e-5, "bf16": 0.03, "int8": 0.05, "int4": 0.5, "hybrid": 0.5}


@pytest.mark.parametrize("tier", ["fp32", "bf16", "int8", "int4", "hybrid"])
def test_20_steps_track_torch_adamw(tier):
    w0, a, b = _pair()
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    opt = HybridAdamW([b], lr=1e-2, weight_decay=0.1, state_precision=tier, min_quant_numel=0, gate_every=5)
    for g in _grads(w0.shape, 20):
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    moved = (a - w0).norm()
    rel = ((a - b).norm() / moved).item()
    assert rel < TOL[tier], (tier, rel)


def test_negative_control_other_optimizer_fails_parity():
    """torch.optim.Adam (L2 decay, not decoupled) must not pass the fp32 check."""
    w0, a, b = _pair()
    ref = torch.optim.Adam([a], lr=1e-2, weight_decay=0.1)
    opt = HybridAdamW([b], lr=1e-2, weight_decay=0.1, state_precision="fp32")
    for g in _grads(w0.shape, 20):
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    rel = ((a - b).norm() / (a - w0).norm()).item()
    assert rel > 100 * TOL["fp32"]


def test_quantized_tiers_ordered_by_error():
    """More bits, less drift from fp32 AdamW (on the same gradients)."""
    errs = {}
    for tier in ("fp32", "int8", "int4"):
        w0, a, b = _pair(seed=3)
        ref = torch.optim.AdamW([a], lr=1e-2)
        opt = HybridAdamW([b], lr=1e-2, state_precision=tier, min_quant_numel=0)
        for g in _grads(w0.shape, 10, seed=4):
            a.grad, b.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
        errs[tier] = (a - b).norm().item()
    assert errs["fp32"] < errs["int8"] < errs["int4"]


def test_bf16_weights_with_stochastic_rounding_learn_small_updates():
    """The BASELINES failure: pure-bf16 weights drop updates below half an ulp.
    With stochastic rounding the mean weight follows the fp32 trajectory."""
    target = torch.full((4096,), 1.0)
    res = {}
    for sr in (True, False):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = HybridAdamW([p], lr=2e-4, weight_decay=0.0, state_precision="fp32", stochastic_rounding=sr)
        for _ in range(10):
            p.grad = torch.full_like(p, 0.3)
            opt.step()
        res[sr] = (target - p.float()).mean().item()  # fp32 AdamW would move 10 * 2e-4
    assert abs(res[True] - 2e-3) < 3e-4
    assert res[False] == 0.0


# --------------------------------------------------------------------------
# state dict
# --------------------------------------------------------------------------

@pytest.mark.parametrize("tier", ["int4", "hybrid", "bf16"])
def test_state_dict_round_trip_is_byte_exact_and_resumes_identically(tier):
    w0, a, b = _pair(dtype=torch.bfloat16)
    kw = dict(lr=1e-2, state_precision=tier, min_quant_numel=0, gate_every=2, seed=9)
    o1 = HybridAdamW([a], **kw)
    gs = _grads(w0.shape, 6)
    for g in gs[:3]:
        a.grad = g.to(torch.bfloat16)
        o1.step()
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    b.data.copy_(a.data)
    o2 = HybridAdamW([b], **kw)
    o2.load_state_dict(torch.load(buf, weights_only=False))
    s1, s2 = o1.state[a], o2.state[b]
    assert s1.keys() == s2.keys()
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            assert s1[k].dtype == s2[k].dtype, k  # quantized stays quantized, fp32 scales stay fp32
            assert torch.equal(s1[k].view(torch.uint8) if s1[k].dim() else s1[k],
                               s2[k].view(torch.uint8) if s2[k].dim() else s2[k]), k
        else:
            assert s1[k] == s2[k], k
    for g in gs[3:]:
        a.grad = g.to(torch.bfloat16)
        b.grad = g.to(torch.bfloat16)
        o1.step()
        o2.step()
    assert torch.equal(a, b)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

def test_nonfinite_gradient_skips_parameter_and_counts():
    w0, _, b = _pair()
    other = torch.nn.Parameter(torch.randn(300))
    opt = HybridAdamW([b, other], lr=1e-2, state_precision="int8", min_quant_numel=0)
    b.grad = torch.randn_like(b)
    other.grad = torch.randn_like(other)
    opt.step()
    snap = {k: v.clone() for k, v in opt.state[b].items() if isinstance(v, torch.Tensor)}
    before = b.detach().clone()
    o_before = other.detach().clone()
    g = torch.randn_like(b)
    g[3, 7] = float("nan")
    b.grad = g
    other.grad = torch.randn_like(other)
    opt.step()
    assert torch.equal(b, before)
    assert not torch.equal(other, o_before)  # the others still step
    for k, v in snap.items():
        if k == "nonfinite_skips":
            continue
        assert torch.equal(opt.state[b][k], v), k
    assert opt.nonfinite_skips() == 1
    assert opt.state[b]["step"].item() == 1.0  # the skipped step does not count for bias correction


def test_sparse_gradient_raises_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = HybridAdamW(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_mixed_dtypes_noncontiguous_and_odd_sizes_in_one_group():
    params = [
        torch.nn.Parameter(torch.randn(64, 70).t()),             # non-contiguous fp32
        torch.nn.Parameter(torch.randn(37, dtype=torch.bfloat16)),  # smaller than a block
        torch.nn.Parameter(torch.randn(5, 301, dtype=torch.bfloat16)),  # not a multiple of 128
        torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float16)),
    ]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = HybridAdamW(params, lr=1e-2, state_precision="int8", quantize_all=True)
    ropt = torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(3):
        for p, r in zip(params, ref):
            g = torch.randn(p.shape) * 0.1
            p.grad, r.grad = g.to(p.dtype), g.to(p.dtype).float()
        opt.step()
        ropt.step()
    assert not params[0].is_contiguous()
    for p, r in zip(params, ref):
        assert torch.isfinite(p.float()).all()
        tol = 0.02 if p.dtype == torch.float32 else 0.05
        torch.testing.assert_close(p.float(), r, rtol=0, atol=tol)


# --------------------------------------------------------------------------
# tiers chosen per tensor, and the gate
# --------------------------------------------------------------------------

def test_embeddings_norms_biases_and_small_tensors_stay_fp32():
    model = torch.nn.Sequential()
    model.add_module("embed_tokens", torch.nn.Embedding(64, 96))
    model.add_module("proj", torch.nn.Linear(96, 96))
    model.add_module("norm", torch.nn.LayerNorm(96))
    model.add_module("tiny", torch.nn.Linear(8, 8, bias=False))
    opt = HybridAdamW(model.named_parameters(), state_precision="int4", min_quant_numel=4096)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tiers = {n: opt.state[p]["tier"] for n, p in model.named_parameters()}
    assert tiers == {"embed_tokens.weight": "fp32", "proj.weight": "int4", "proj.bias": "fp32",
                     "norm.weight": "fp32", "norm.bias": "fp32", "tiny.weight": "fp32"}
    groups = param_groups(model, "int8")
    assert [g["state_precision"] for g in groups] == ["fp32", "int8"]
    opt2 = HybridAdamW(model.named_parameters(), state_precision="int4", quantize_all=True)
    opt2.step()
    assert {opt2.state[p]["tier"] for p in model.parameters()} == {"int4"}


def _outlier_grad(rows, cols, hot_blocks):
    g = torch.randn(rows * cols) * 1e-3
    for b in hot_blocks:  # one huge element per block: the rest quantize to ~0
        g[b * 128] = 10.0
    return g.view(rows, cols)


def test_gate_promotes_blocks_with_large_update_error_within_cap():
    p = torch.nn.Parameter(torch.randn(32, 128))  # 32 blocks
    opt = HybridAdamW([p], state_precision="hybrid", hybrid_bits=8, hybrid_cap=0.125,  # 4 fp32 rows
                      gate_every=1000, min_quant_numel=0)
    hot = [2, 5, 9, 20, 21, 30]
    cold = [b for b in range(32) if b not in hot]
    p.grad = _outlier_grad(32, 128, hot)
    opt.step()
    st = opt.state[p]
    fp32_blocks = (st["slot"] >= 0).nonzero().flatten().tolist()
    assert len(fp32_blocks) == 4  # capped: 6 blocks want fp32, 4 rows exist
    assert set(fp32_blocks) <= set(hot)
    assert sorted(st["slot"][st["slot"] >= 0].tolist()) == [0, 1, 2, 3]
    # the error the step wrote: an outlier crushes the block's other codes to zero
    assert st["err"][fp32_blocks].min() > 0.5
    assert st["err"][cold].max() < 0.1
    # hysteresis: an fp32 block whose error sits between demote and promote stays
    before = st["slot"].clone()
    st["err"].fill_(0.5 * (opt.param_groups[0]["gate_promote"] + opt.param_groups[0]["gate_demote"]))
    K.hybrid_regate_(st, bits=8, promote=opt.param_groups[0]["gate_promote"],
                     demote=opt.param_groups[0]["gate_demote"])
    assert torch.equal(st["slot"], before)
    # and demotion below the low threshold moves the state back into the int4 store
    st["err"].zero_()
    moved = K.hybrid_regate_(st, bits=8, promote=0.02, demote=0.01)
    assert moved["demoted"] == 4 and (st["slot"] < 0).all()


def test_gate_migration_preserves_moments():
    p = torch.nn.Parameter(torch.randn(8, 128))
    opt = HybridAdamW([p], state_precision="hybrid", hybrid_cap=0.5, gate_every=1000, min_quant_numel=0)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    from unsloth_fx.runtime import optim_reference as R
    m_before = R.decode_m(R.unpack_m(st["m_codes"], 4), st["m_scale"], 4)
    st["err"].zero_()
    st["err"][[1, 6]] = 1.0
    K.hybrid_regate_(st, bits=4, promote=0.02, demote=0.01)
    rows = st["slot"][[1, 6]].long()
    torch.testing.assert_close(st["pool_m"][rows], m_before[[1, 6]])


# --------------------------------------------------------------------------
# hyper-parameters as tensors, schedulers, bytes
# --------------------------------------------------------------------------

def test_lr_is_a_tensor_updated_in_place_by_schedulers():
    p = torch.nn.Parameter(torch.randn(300))
    opt = HybridAdamW([p], lr=1e-2, state_precision="fp32")
    lr_t = opt.param_groups[0]["lr"]
    assert isinstance(lr_t, torch.Tensor) and lr_t.dtype == torch.float32 and lr_t.dim() == 0
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr_t  # same tensor object: graphs reading it need no recompile
    assert lr_t.item() == pytest.approx(5e-3)


def test_state_bytes_per_param_per_tier():
    expect = {"fp32": 8.0, "bf16": 4.0, "int8": 2 + 8 / 128, "int4": 1 + 8 / 128,
              "hybrid": 1 + 8 / 128 + 8 / 128 + 0.125 * 8}
    for tier, bpp in expect.items():
        p = torch.nn.Parameter(torch.randn(64, 128))
        opt = HybridAdamW([p], state_precision=tier, hybrid_cap=0.125, min_quant_numel=0)
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state_bytes_per_param() == pytest.approx(bpp), tier


def test_invalid_arguments_name_the_fix():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_precision"):
        HybridAdamW(p, state_precision="int2")
    with pytest.raises(ValueError, match="gate_demote"):
        HybridAdamW(p, gate_promote=0.01, gate_demote=0.1)


# --------------------------------------------------------------------------
# the GPU scripts' CPU smoke modes (so they cannot rot unseen)
# --------------------------------------------------------------------------

def _load_script(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_ufx_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_optim_smoke(tmp_path):
    mod = _load_script("bench_optim")
    out = tmp_path / "b.json"
    rows = mod.main(["--smoke", "--sizes", "3000", "--tiers", "int8,hybrid", "--out", str(out)])
    assert out.exists()
    impls = [r["impl"] for r in rows]
    assert "unsloth_fx int8" in impls and any("torch AdamW" in i for i in impls)
    assert mod.bytes_per_param("int8") == pytest.approx(6 + 4 + 16 / 128)  # p r+w, g r, codes r+w, 2 scales r+w
    assert all(r["GBps"] > 0 and r["time_s"] > 0 for r in rows)


def test_convergence_smoke(tmp_path):
    mod = _load_script("convergence")
    out = mod.main(["--smoke", "--steps", "3", "--variants", "amp,int8", "--out-dir", str(tmp_path)])
    assert (tmp_path / "convergence.json").exists()
    assert set(out["summary"]) == {"amp", "int8"}
    for r in out["runs"]:
        assert math.isfinite(r["final_val"]) and r["final_val"] < 6.0  # below uniform over 256 bytes (5.55) + slack
    train, val = mod.load_corpus()
    assert len(train) > 1_000_000 and len(val) > 10_000
