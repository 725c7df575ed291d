"""HybridAdamW's state arena: all moment state in one buffer per device and dtype.

Specification: with ``state_arena=True`` (default) the first step gives every
trainable parameter its state at once, as 256-byte aligned, non-overlapping views
into one buffer per device and dtype (one storage viewed as several dtypes cannot
be written by ``torch.save``), counters included; the numbers are bit for bit those
of ``state_arena=False`` (one allocation per tensor) through ``step()`` and the
fused backward's ``step_params``; ``load_state_dict`` copies into a fresh arena;
a checkpoint is no bigger than without the arena (beyond alignment gaps).
"""

import io

import pytest
import torch

from unsloth_fx.optim import ARENA_ALIGN, HybridAdamW

ALIGN = 256  # the specification (the planner's allocator model and Triton's vector loads rely on it)
from unsloth_fx.zoo import build_model

# (name, shape): an embedding (high_precision_tier), two matrices of one tier (a multi-tensor
# bucket: its kernel reads the state through raw pointers), a norm (fp32 moments), an odd size
SHAPES = (("embed.weight", (40, 32)), ("layer.q.weight", (48, 64)), ("layer.k.weight", (48, 64)),
          ("norm.weight", (64,)), ("layer.o.weight", (33, 17)))

# (state_precision, high_precision_tier, param dtype, extra options)
CASES = {
    "fp32": ("fp32", "fp32", torch.float32, {}),
    "bf16": ("bf16", "fp32", torch.bfloat16, {}),
    "int8": ("int8", "bf16", torch.float32, {}),
    "int4": ("int4", "int8", torch.bfloat16, {}),
    "hybrid4": ("hybrid", "int4", torch.float32, {}),
    "hybrid8": ("hybrid", "hybrid", torch.bfloat16, {"hybrid_bits": 8, "hybrid_cap": 0.5}),
}


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(*s, generator=gen).to(dtype))) for n, s in SHAPES]


def _grads(named, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1 for _, p in named] for _ in range(steps)]


def _opt(named, case="int4", **kw):
    sp, hp, _, extra = CASES[case]
    return HybridAdamW(named, lr=1e-2, weight_decay=0.1, state_precision=sp, high_precision_tier=hp,
                       min_quant_numel=0, gate_every=2, seed=5, **{**extra, **kw})


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def _tensors(opt):
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def _assert_same(o1, n1, o2, n2):
    for (name, a), (_, b) in zip(n1, n2):
        assert torch.equal(_bits(a), _bits(b)), name
        s1, s2 = o1.state[a], o2.state[b]
        assert s1.keys() == s2.keys(), name
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert s1[k].dtype == s2[k].dtype and s1[k].shape == s2[k].shape, (name, k)
                assert torch.equal(_bits(s1[k]), _bits(s2[k])), (name, k)
            else:
                assert s1[k] == s2[k], (name, k)


def _storages(ts):
    return {t.untyped_storage().data_ptr() for t in ts}


def _assert_one_arena(opt):
    """Every state tensor a view of its dtype's one storage, 256-byte aligned, none overlapping."""
    ts = _tensors(opt)
    by_dtype: dict = {}
    for t in ts:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        assert len(_storages(group)) == 1, f"{dtype}: {len(_storages(group))} storages"
        spans = sorted((t.storage_offset() * t.element_size(), t.nbytes) for t in group)
        assert ARENA_ALIGN == ALIGN and all(start % ALIGN == 0 for start, _ in spans), dtype
        assert all(s0 + n0 <= s1 for (s0, n0), (s1, _) in zip(spans, spans[1:])), f"{dtype}: overlapping"
    assert len(_storages(ts)) == len(by_dtype)  # no two dtypes share a storage
    nbytes = sum(g[0].untyped_storage().nbytes() for g in by_dtype.values())
    assert opt.state_arena_bytes() == nbytes >= opt.state_bytes()
    assert nbytes < sum(t.nbytes for t in ts) + ARENA_ALIGN * len(ts)  # only alignment gaps on top


# --------------------------------------------------------------------------
# same numbers as one allocation per tensor
# --------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["step", "step_params"])
@pytest.mark.parametrize("case", list(CASES))
def test_arena_is_bit_exact_with_per_tensor_state(case, entry):
    dtype = CASES[case][2]
    n1, n2 = _params(dtype), _params(dtype)
    o1, o2 = _opt(n1, case), _opt(n2, case, state_arena=False)
    for k, gs in enumerate(_grads(n1, 3)):  # gate_every=2: a re-gate at step 2
        for o, named in ((o1, n1), (o2, n2)):
            # step 1 leaves the norm without a gradient: it must get its state anyway
            live = [(p, g) for (name, p), g in zip(named, gs) if not (k == 0 and name == "norm.weight")]
            if entry == "step":
                for p, g in live:
                    p.grad = g.clone()
                o.step()
                o.zero_grad(set_to_none=True)
            else:
                o.step_params([p for p, _ in live], [g.clone() for _, g in live])
        if k == 0:
            _assert_one_arena(o1)
    _assert_same(o1, n1, o2, n2)
    _assert_one_arena(o1)


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

def test_first_step_lays_out_every_trainable_parameter_in_one_arena():
    named = _params()
    frozen = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    opt = _opt(named + [("frozen.weight", frozen)], "hybrid4")
    assert opt.state_arena is True and opt.state_arena_bytes() == 0
    named[1][1].grad = torch.randn(48, 64)  # one gradient: all trainable parameters get state
    opt.step()
    assert all(opt.state[p] for _, p in named) and not opt.state.get(frozen)
    _assert_one_arena(opt)
    counters = [opt.state[p][k] for _, p in named for k in ("step", "nonfinite_skips")]
    assert _storages(counters) == _storages(t for t in _tensors(opt) if t.dtype == torch.float32)
    # a parameter without a gradient so far steps from the arena, nothing new allocated
    before = opt.state_arena_bytes()
    named[3][1].grad = torch.randn(64)
    opt.step()
    assert float(opt.state[named[3][1]]["step"]) == 1.0
    assert opt.state_arena_bytes() == before
    _assert_one_arena(opt)


@pytest.mark.parametrize("case", list(CASES))
def test_state_before_the_first_update_is_that_of_init_state(case):
    """0x88 nibbles for 4-bit m codes, slot -1, zeros elsewhere: set up, not yet stepped."""
    dtype = CASES[case][2]
    n1, n2 = _params(dtype), _params(dtype)
    o1, o2 = _opt(n1, case), _opt(n2, case, state_arena=False)
    # what the first step() / step_params() does before any update: the arena for all, init_state for one
    o1._init_arena()
    for k, (_, p) in enumerate(n2):
        o2._state_of(o2.param_groups[0], p, k, k + 1)
    _assert_same(o1, n1, o2, n2)
    _assert_one_arena(o1)


def test_group_added_later_gets_its_own_small_arena():
    named = _params()
    opt = _opt(named[:2], "int8")
    named[0][1].grad = torch.randn(40, 32)
    opt.step()
    first = opt.state_arena_bytes()
    opt.add_param_group({"params": [named[2][1], named[4][1]], "param_names": [named[2][0], named[4][0]]})
    named[4][1].grad = torch.randn(33, 17)
    opt.step()
    def tensors(ps):
        return [t for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)]

    old, new = tensors([named[0][1], named[1][1]]), tensors([named[2][1], named[4][1]])
    assert not _storages(old) & _storages(new)
    assert len(_storages(new)) == len({t.dtype for t in new})  # both new parameters, one new buffer per dtype
    assert first < opt.state_arena_bytes() < 2 * first + 8 * ARENA_ALIGN


def test_per_tensor_state_when_the_arena_is_off():
    named = _params()
    opt = _opt(named, "hybrid4", state_arena=False)
    named[1][1].grad = torch.randn(48, 64)
    opt.step()
    assert [n for n, p in named if opt.state.get(p)] == ["layer.q.weight"]  # today: state on first step only
    ts = [t for t in _tensors(opt) if t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in ts}) == len(ts)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in ts)
    assert opt.state_arena_bytes() == 0


# --------------------------------------------------------------------------
# state dict and checkpoints
# --------------------------------------------------------------------------

@pytest.mark.parametrize("arena_after", [True, False])
def test_state_dict_round_trip_loads_into_a_fresh_arena_and_resumes_identically(arena_after):
    n1, n2 = _params(torch.bfloat16), _params(torch.bfloat16)
    o1 = _opt(n1, "hybrid4")
    gs = _grads(n1, 4)  # gate_every=2: a re-gate before and after the round trip
    for step_grads in gs[:2]:
        for (_, p), g in zip(n1, step_grads):
            p.grad = g.clone()
        o1.step()
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    for (_, a), (_, b) in zip(n1, n2):
        b.data.copy_(a.data)
    o2 = _opt(n2, "hybrid4", state_arena=arena_after)
    o2.load_state_dict(torch.load(buf, weights_only=False))
    _assert_same(o1, n1, o2, n2)
    if arena_after:
        _assert_one_arena(o2)
        assert o2.state_arena_bytes() == o1.state_arena_bytes()
    else:
        assert o2.state_arena_bytes() == 0
    for step_grads in gs[2:]:
        for (_, a), (_, b), g in zip(n1, n2, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    _assert_same(o1, n1, o2, n2)


def test_checkpoint_of_arena_state_is_no_bigger_than_per_tensor_state():
    """torch.save writes a shared storage once: the arena's checkpoint is the per-tensor one plus its
    alignment gaps (and minus per-storage records), not one copy of the arena per tensor."""
    sizes = {}
    for arena in (True, False):
        torch.manual_seed(0)
        model = build_model("tiny-qwen2", device="cpu")
        opt = HybridAdamW(model.named_parameters(), state_precision="int4", min_quant_numel=0, state_arena=arena,
                          implementation="reference")  # the bytes, not the kernel, are under test
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.01
        opt.step()
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict()}, buf)  # what Trainer.save_checkpoint writes for it
        sizes[arena] = (len(buf.getvalue()), len(_tensors(opt)))
    (with_arena, n), (without, _) = sizes[True], sizes[False]
    assert with_arena <= without + ARENA_ALIGN * n, sizes
    assert with_arena - without < 8 * 1024, sizes


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["int4", "hybrid4", "bf16"])
def test_cuda_kernels_give_the_same_bits_on_arena_views(case):
    # the compiled Triton kernels (not the interpreter) read and write the state through views at offsets
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runs = []
    for arena in (True, False):
        named = [(n, torch.nn.Parameter(p.detach().cuda())) for n, p in _params(CASES[case][2])]
        named.append(("mlp.weight", torch.nn.Parameter(torch.randn(1536, 896, device="cuda").to(CASES[case][2]))))
        opt = _opt(named, case, state_arena=arena)
        gen = torch.Generator(device="cuda").manual_seed(3)
        for _ in range(3):
            for _, p in named:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(p.dtype) * 0.1
            opt.step()
        runs.append((opt, named))
    (o1, n1), (o2, n2) = runs
    _assert_same(o1, n1, o2, n2)
    assert len(_storages(_tensors(o1))) <= 3 < len(_storages(_tensors(o2)))
